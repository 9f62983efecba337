"""The further losses (Gaussian/Poisson NLL, Huber, smooth L1, label smoothing, callables).

References are independent of ``cola_curvature``: the torch loss itself (or the callable's
function) differentiated by ``torch.autograd`` double backward, one unit vector at a time,
in float64; the model Jacobian row by row; JAX through ``jax.jacrev`` / ``jax.hessian``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cola_curvature as cc
from cola_curvature.backends.torch.losses import as_loss
from cola_curvature.backends.torch.state import TorchExampleRandom
from tests._tols import EXACT_ATOL, EXACT_RTOL, MC_RTOL

F64 = torch.float64

#: Standard-normal quantile of the statistical tests: a correct sampler fails one entry's
#: check with probability about 6e-7.
Z = 5.0

#: Fixed variance of the Gaussian case.
VARIANCE = 0.3


def log_cosh_coupled(f, y):
    """A convex, non-separable-within-example loss: ``Σ log cosh(f - y) + ¼ (Σ_i f_i)²``.

    Its output Hessian ``diag(1 - tanh²(f - y)) + ½ 1 1ᵀ`` is PSD and not diagonal.
    """
    r = f - y
    return (torch.log(torch.cosh(r)).sum() + 0.25 * (f.sum(-1) ** 2).sum()).reshape(())


def gaussian_torch(reduction):
    """``F.gaussian_nll_loss`` with the fixed variance ``VARIANCE`` and ``full=True``."""

    def loss(f, y):
        var = torch.full_like(f, VARIANCE)
        return F.gaussian_nll_loss(f, y, var, full=True, reduction=reduction)

    return loss


def callable_torch(reduction):
    """:func:`log_cosh_coupled` with torch's reduction (``"mean"`` over all entries)."""
    return lambda f, y: log_cosh_coupled(f, y) / (1 if reduction == "sum" else f.numel())


# name: (torch loss for a reduction, cc loss for a reduction, target kind, output shape)
CASES = {
    "ce-smoothing": (
        lambda r: nn.CrossEntropyLoss(reduction=r, label_smoothing=0.1),
        lambda r: as_loss(nn.CrossEntropyLoss(reduction=r, label_smoothing=0.1)),
        "labels",
        (4, 3, 2),
    ),
    "poisson": (
        lambda r: nn.PoissonNLLLoss(reduction=r),
        lambda r: as_loss(nn.PoissonNLLLoss(reduction=r)),
        "counts",
        (4, 3),
    ),
    "poisson-full": (
        lambda r: nn.PoissonNLLLoss(full=True, reduction=r),
        lambda r: as_loss(nn.PoissonNLLLoss(full=True, reduction=r)),
        "counts",
        (4, 3),
    ),
    "gaussian": (
        gaussian_torch,
        lambda r: cc.losses.GaussianNLL(var=VARIANCE, full=True, reduction=r),
        "real",
        (4, 3),
    ),
    "huber": (
        lambda r: nn.HuberLoss(reduction=r, delta=0.7),
        lambda r: as_loss(nn.HuberLoss(reduction=r, delta=0.7)),
        "real",
        (4, 3),
    ),
    "smooth-l1": (
        lambda r: nn.SmoothL1Loss(reduction=r, beta=0.5),
        lambda r: as_loss(nn.SmoothL1Loss(reduction=r, beta=0.5)),
        "real",
        (4, 2, 3),
    ),
    "callable": (
        callable_torch,
        lambda r: cc.losses.CallableLoss(log_cosh_coupled, reduction=r),
        "real",
        (4, 3),
    ),
}


def targets_for(kind, shape, generator):
    """Targets of ``kind`` for outputs of ``shape`` (labels drop the class axis 1)."""
    if kind == "labels":
        return torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
    if kind == "counts":
        return torch.randint(0, 6, shape, generator=generator).to(F64)
    return 1.5 * torch.randn(shape, dtype=F64, generator=generator)


def outputs_and_targets(name, seed=0):
    """Random float64 outputs and targets of case ``name``."""
    _, _, kind, shape = CASES[name]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=F64, generator=generator), targets_for(kind, shape, generator)


def dense_output_hessian(loss_func, f, y):
    """``∇²_f loss_func(f, y)`` over the whole batch, ``(numel f, numel f)``, by double backward."""
    x = f.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(loss_func(x, y), x, create_graph=True)
    flat = gradient.reshape(-1)
    eye = torch.eye(flat.numel(), dtype=F64)
    rows = [torch.autograd.grad(flat, x, e, retain_graph=True)[0].reshape(-1) for e in eye]
    return torch.stack(rows)


def relative_error(actual, expected):
    """``‖actual - expected‖ / ‖expected‖`` (Frobenius)."""
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_value_gradient_and_scale_match_the_torch_loss(name, reduction):
    torch_loss, make, _, _ = CASES[name]
    f, y = outputs_and_targets(name)
    loss = make(reduction)
    summed = torch_loss("sum")
    loss.check_target(f, y)
    assert torch.allclose(loss.sum_value(f, y), summed(f, y), rtol=1e-12)
    assert torch.allclose(
        loss.scale(f, f.shape[0]) * loss.sum_value(f, y), torch_loss(reduction)(f, y), rtol=1e-12
    )
    x = f.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(summed(x, y), x)
    assert torch.allclose(loss.output_gradient(f, y), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(CASES))
def test_output_hessian_and_its_factor_match_double_backward(name):
    torch_loss, make, _, _ = CASES[name]
    f, y = outputs_and_targets(name, seed=1)
    loss = make("sum")
    loss.check_target(f, y)
    hessian = dense_output_hessian(torch_loss("sum"), f, y)
    u = torch.randn((2, *f.shape), dtype=F64, generator=torch.Generator().manual_seed(2))
    expected = (hessian @ u.reshape(2, -1).T).T.reshape(u.shape)
    assert torch.allclose(loss.hessian_matmat(f, u, y), expected, rtol=EXACT_RTOL, atol=EXACT_ATOL)
    factor = loss.hessian_sqrt(f, y)
    size = math.prod(f.shape[1:])
    blocks = hessian.reshape(f.shape[0], size, f.shape[0], size)
    for n in range(f.shape[0]):
        columns = factor[:, n].reshape(factor.shape[0], size)
        assert torch.allclose(
            columns.T @ columns, blocks[n, :, n], rtol=EXACT_RTOL, atol=EXACT_ATOL
        )
        # the loss is separable over examples: the reference has no cross-example block
        others = [m for m in range(f.shape[0]) if m != n]
        assert blocks[n, :, others].abs().max() <= EXACT_ATOL


def test_huber_cases_exercise_both_pieces():
    """The Huber references above see entries inside and outside the quadratic region."""
    for name, threshold in [("huber", 0.7), ("smooth-l1", 0.5)]:
        f, y = outputs_and_targets(name, seed=1)
        inside = (f - y).abs() < threshold
        assert inside.any() and (~inside).any()


# ---------------------------------------------------------------- GGN on a tiny MLP (torch)


def mlp(outputs):
    """``Linear(3, 4) → tanh → Linear(4, outputs)`` in float64, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).to(F64)


def problem(name, loss_arg=None):
    """``(model, params, data)`` for case ``name``: 7 examples in uneven batches 4 + 3."""
    _, _, kind, shape = CASES[name]
    model = mlp(math.prod(shape[1:]))
    if len(shape) > 2:
        model.append(nn.Unflatten(1, shape[1:]))
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(7, 3, dtype=F64, generator=generator)
    Y = targets_for(kind, (7, *shape[1:]), generator)
    return model, list(model.parameters()), [(X[:4], Y[:4]), (X[4:], Y[4:])]


def reference_ggn(model, torch_loss, reduction, params, data):
    """``R Jᵀ H J`` from the row-by-row Jacobian and the double-backward output Hessian.

    ``R`` is the ratio of the torch loss with ``reduction`` to its sum on all the data.
    """
    X = torch.cat([x for x, _ in data])
    Y = torch.cat([y for _, y in data])
    outputs = model(X)
    flat = outputs.reshape(-1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(flat[r], params, retain_graph=True)])
        for r in range(flat.numel())
    ]
    jacobian = torch.stack(rows)
    f = outputs.detach()
    hessian = dense_output_hessian(torch_loss("sum"), f, Y)
    scale = torch_loss(reduction)(f, Y) / torch_loss("sum")(f, Y)
    return scale * jacobian.T @ hessian @ jacobian


def dense(operator):
    """``A @ I`` of a ``(D, D)`` operator on torch parameters."""
    return operator @ torch.eye(operator.shape[0], dtype=F64)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ggn_of_an_mlp_matches_the_dense_reference(name, reduction):
    torch_loss, make, _, _ = CASES[name]
    model, params, data = problem(name)
    expected = reference_ggn(model, torch_loss, reduction, params, data)
    ggn = cc.GGN(model, make(reduction), params, data)
    assert relative_error(dense(ggn), expected) < EXACT_RTOL


@pytest.mark.parametrize("name", ["huber", "callable", "poisson"])
def test_diagonal_curvature_uses_the_exact_factor(name):
    """``DiagonalCurvature`` (type-2) backpropagates ``hessian_sqrt``: the GGN's diagonal."""
    torch_loss, make, _, _ = CASES[name]
    model, params, data = problem(name)
    expected = reference_ggn(model, torch_loss, "mean", params, data).diagonal()
    diagonal = cc.DiagonalCurvature(model, make("mean"), params, data)
    assert relative_error(dense(diagonal).diagonal(), expected) < EXACT_RTOL


# ------------------------------------------------------------------ GGN of a JAX callable loss


def test_jax_callable_loss_ggn_matches_jacobian_and_hessian(jax_float64):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    def loss_fn(f, y):
        return jnp.log(jnp.cosh(f - y)).sum() + 0.25 * (f.sum(-1) ** 2).sum()

    def model_fn(params, x):
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "w1": jax.random.normal(keys[0], (3, 4)),
        "w2": jax.random.normal(keys[1], (4, 2)),
    }
    X = jax.random.normal(keys[2], (7, 3))
    Y = jax.random.normal(keys[3], (7, 2))
    data = [(X[:4], Y[:4]), (X[4:], Y[4:])]
    flat, unravel = ravel_pytree(params)
    jacobian = jax.jit(jax.jacrev(lambda t: model_fn(unravel(t), X).ravel()))(flat)
    outputs = model_fn(params, X)
    hessian = jax.jit(jax.hessian(lambda f: loss_fn(f.reshape(outputs.shape), Y)))(outputs.ravel())
    expected = jacobian.T @ hessian @ jacobian / outputs.size  # "mean": N · numel(f_n) terms
    loss = cc.losses.CallableLoss(loss_fn, reduction="mean")
    actual = cc.GGN(model_fn, loss, params, data, check_deterministic=False) @ jnp.eye(flat.size)
    assert jnp.linalg.norm(actual - expected) / jnp.linalg.norm(expected) < EXACT_RTOL


# ------------------------------------------------------------------------------ sampling


def test_gaussian_and_poisson_samples_have_the_likelihood_mean():
    """Sample means lie within ``Z`` standard errors ``σ / √M`` of the likelihood's mean."""
    samples = 4000
    f = torch.tensor([[-1.0, 0.0, 1.5]], dtype=F64)
    rng = TorchExampleRandom(0, 0)
    for loss, mean, std in [
        (cc.losses.GaussianNLL(var=VARIANCE), f, math.sqrt(VARIANCE) * torch.ones_like(f)),
        (cc.losses.PoissonNLL(), f.exp(), f.exp().sqrt()),
    ]:
        drawn = loss.sample(f, rng, samples)
        assert drawn.shape == (samples, *f.shape)
        assert ((drawn.mean(0) - mean).abs() <= Z * std / math.sqrt(samples)).all()
    counts = cc.losses.PoissonNLL().sample(f, rng, 50)
    assert torch.equal(counts, counts.round()) and (counts >= 0).all()


@pytest.mark.parametrize("name", ["ce-smoothing", "poisson", "gaussian"])
def test_sampled_gradients_have_the_output_hessian_as_second_moment(name):
    """``E[d dᵀ] = H`` entry-wise within ``Z`` standard errors estimated from the samples."""
    _, make, _, _ = CASES[name]
    f, _ = outputs_and_targets(name, seed=4)
    f = f[:2]
    loss = make("sum")
    samples = 4000
    d = loss.sampled_output_gradients(f, TorchExampleRandom(0, 0), samples).reshape(samples, 2, -1)
    products = torch.einsum("sni,snj->snij", d, d)
    size = d.shape[-1]
    eye = torch.eye(size, dtype=F64).reshape((size, 1, *f.shape[1:]))
    hessian = loss.hessian_matmat(f, eye * torch.ones_like(f)).reshape(size, 2, size)
    expected = hessian.permute(1, 2, 0)
    standard_error = products.std(0) / math.sqrt(samples)
    assert ((products.mean(0) - expected).abs() <= Z * standard_error + EXACT_ATOL).all()


def test_monte_carlo_fisher_of_a_callable_with_a_likelihood_estimates_the_ggn():
    """``fn = ½ Σ (f - y)²`` is ``-log N(y | f, I)``: its Monte-Carlo Fisher tends to the GGN."""
    model, params, data = problem("gaussian")
    loss = cc.losses.CallableLoss(
        lambda f, y: 0.5 * ((f - y) ** 2).sum(), likelihood=cc.losses.GaussianNLL(var=1.0)
    )
    ggn = dense(cc.GGN(model, loss, params, data))
    fisher = dense(cc.FisherMC(model, loss, params, data, mc_samples=2000))
    assert relative_error(fisher, ggn) < MC_RTOL


# -------------------------------------------------------------------------------- errors


def test_indefinite_callable_loss_is_refused():
    f, y = outputs_and_targets("callable")
    loss = cc.losses.CallableLoss(lambda f, y: (torch.cos(f - y)).sum())
    loss.check_target(f, y)
    with pytest.raises(ValueError, match="indefinite"):
        loss.hessian_sqrt(f, y)
    model, params, data = problem("callable")
    with pytest.raises(ValueError, match="indefinite"):
        dense(cc.GGN(model, loss, params, data))


def test_heteroscedastic_gaussian_nll_is_refused_by_the_psd_check():
    """A variance predicted by the model (second output) makes the output Hessian indefinite."""

    def gaussian_nll(f, y):
        mean, variance = f[:, :1], f[:, 1:]
        return F.gaussian_nll_loss(mean, y, variance, reduction="sum")

    f = torch.tensor([[0.0, 1.0], [0.1, 2.0]], dtype=F64)
    y = torch.tensor([[0.1], [0.0]], dtype=F64)  # residuals² < variance / 2
    loss = cc.losses.CallableLoss(gaussian_nll)
    loss.check_target(f, y)
    with pytest.raises(ValueError, match="indefinite"):
        loss.hessian_matmat(f, torch.ones((1, *f.shape), dtype=F64), y)


@pytest.mark.parametrize(
    ("loss_func", "error", "match"),
    [
        (nn.GaussianNLLLoss(), TypeError, r"GaussianNLL\(var="),
        (nn.PoissonNLLLoss(log_input=False), ValueError, "log_input=True"),
        (nn.L1Loss(), TypeError, "CallableLoss"),
        (lambda f, y: ((f - y) ** 2).sum(), TypeError, "CallableLoss"),
    ],
    ids=["gaussian-module", "poisson-rates", "l1", "bare-callable"],
)
def test_unsupported_torch_losses_name_the_alternative(loss_func, error, match):
    model, params, data = problem("huber")
    with pytest.raises(error, match=match):
        cc.GGN(model, loss_func, params, data)


@pytest.mark.parametrize(
    "make",
    [
        lambda: cc.losses.GaussianNLL(var=-1.0),
        lambda: cc.losses.GaussianNLL(var=torch.ones(3)),
        lambda: cc.losses.SmoothL1(beta=0.0),
        lambda: cc.losses.CrossEntropy(label_smoothing=1.5),
        lambda: cc.losses.CallableLoss(log_cosh_coupled, terms_per_example=0),
    ],
    ids=["negative-var", "array-var", "l1-beta", "smoothing", "terms"],
)
def test_invalid_loss_arguments_raise(make):
    with pytest.raises(ValueError):
        make()


def test_callable_loss_arguments_are_type_checked():
    with pytest.raises(TypeError, match="callable"):
        cc.losses.CallableLoss("mse")
    with pytest.raises(TypeError, match="likelihood"):
        cc.losses.CallableLoss(log_cosh_coupled, likelihood=nn.MSELoss())


@pytest.mark.parametrize("name", ["huber", "callable"])
def test_monte_carlo_without_a_likelihood_raises(name):
    _, make, _, _ = CASES[name]
    model, params, data = problem(name)
    with pytest.raises(ValueError, match="no Monte-Carlo Fisher"):
        dense(cc.FisherMC(model, make("mean"), params, data))


def test_target_dependent_hessian_needs_the_targets():
    f, y = outputs_and_targets("huber")
    loss = cc.losses.Huber()
    with pytest.raises(ValueError, match="pass y to hessian_matmat"):
        loss.hessian_sqrt(f)
    with pytest.raises(ValueError, match="pass y to hessian_matmat"):
        loss.hessian_matmat(f, f[None])


# ------------------------------------------------- NLLLoss on a log-softmax model = CE on logits


@pytest.fixture(scope="module")
def log_softmax_twins():
    """An MLP on 3 classes with sequence outputs ``(N, C, T)``, with and without log-softmax."""
    generator = torch.Generator().manual_seed(9)
    logits = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Unflatten(1, (3, 2)))
    logits = logits.to(F64)
    log_probabilities = nn.Sequential(logits, nn.LogSoftmax(dim=1))
    X = torch.randn(7, 3, dtype=F64, generator=generator)
    y = torch.randint(0, 3, (7, 2), generator=generator)
    return logits, log_probabilities, list(logits.parameters()), [(X[:4], y[:4]), (X[4:], y[4:])]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(
    "operator",
    [
        cc.GGN,
        cc.Hessian,
        lambda *args: cc.FisherMC(*args, mc_samples=3, seed=2),
        lambda *args: cc.KFAC(*args),
    ],
    ids=["ggn", "hessian", "mc-fisher", "kfac"],
)
def test_nll_of_log_probabilities_equals_cross_entropy_on_the_logits(
    log_softmax_twins, reduction, operator
):
    logits, log_probabilities, params, data = log_softmax_twins
    nll = dense(operator(log_probabilities, nn.NLLLoss(reduction=reduction), params, data))
    ce = dense(operator(logits, nn.CrossEntropyLoss(reduction=reduction), params, data))
    assert relative_error(nll, ce) < EXACT_RTOL


def test_nll_refuses_outputs_that_are_not_log_probabilities(log_softmax_twins):
    logits, _, params, data = log_softmax_twins
    with pytest.raises(ValueError, match="log-probabilities"):
        dense(cc.GGN(logits, nn.NLLLoss(), params, data))
