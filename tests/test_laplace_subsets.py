"""Laplace posteriors over a subset of the weights: the last layer and subnetworks.

Three references. laplace-torch 0.3's ``subset_of_weights="last_layer"`` (skipped when it is
not installed) for ``hessian_structure`` ``"full"``, ``"diag"`` and ``"kron"``: evidence,
posterior precision and GLM predictive (``_glm_predictive_distribution``: ``f`` and
``J P⁻¹ Jᵀ``). Its ``"kron"`` gives a layer's weight and bias separate Kronecker blocks while
ours joins them (``[W b]`` with the augmented input), so the two are the same matrix only for
a last layer without bias, which is where they are compared (with a bias, see
``tests/test_laplace_torch.py``). laplace-torch builds ``"full"`` on ``torch.eye`` of the
default dtype, so it is fitted with float64 as the default (see that file).

And a dense float64 reference of every formula from the GGN of all parameters built by
double backward (``tests/double_backward_reference.py``), restricted to the subset: ``P_S
= G_SS / σ² + δ I``, the evidence with ``θ*_S`` and ``|S|``, and ``J_S P_S⁻¹ J_Sᵀ``.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests.double_backward_reference import dense_ggn, dense_jacobian

F64 = torch.float64
DELTA, SIGMA = 0.7, 0.3
HYPERPARAMETERS = [(0.5, 0.2), (1.0, 0.3), (3.0, 1.0)]
RTOL = 1e-9


def trained(model, X, y, loss_func, steps):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_func(model(X), y).backward()
        optimizer.step()
    return model


def regression(bias=True):
    generator = torch.Generator().manual_seed(0)
    X = 8 * torch.rand(40, 1, generator=generator, dtype=F64)
    y = torch.sin(X) + 0.3 * torch.randn(40, 1, generator=generator, dtype=F64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1, bias=bias)).to(F64)
    return trained(model, X, y, nn.MSELoss(), 200), nn.MSELoss(), X, y


def classification(bias=True):
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(30, 2, generator=generator, dtype=F64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3, bias=bias)).to(F64)
    return trained(model, X, y, nn.CrossEntropyLoss(), 100), nn.CrossEntropyLoss(), X, y


def batches(X, y):
    return [(X[:17], y[:17]), (X[17:], y[17:])]


PROBLEMS = {
    "regression": regression(),
    "classification": classification(),
    "regression-no-bias": regression(bias=False),
    "classification-no-bias": classification(bias=False),
}


def ours(name, curvature, delta=DELTA, sigma=SIGMA, **subset):
    model, loss_func, X, y = PROBLEMS[name]
    return cc.Laplace(
        model,
        loss_func,
        list(model.parameters()),
        batches(X, y),
        curvature=curvature,
        prior_precision=delta,
        sigma_noise=sigma if "regression" in name else 1.0,
        **subset,
    )


# --- last layer against laplace-torch ----------------------------------------------------

STRUCTURES = {"full": "full", "diag": "diag", "kron": "kfac"}


@pytest.fixture(scope="module")
def laplace_torch():
    return pytest.importorskip(
        "laplace", reason="laplace-torch is not installed (make test installs it with --no-deps)"
    )


def fit_theirs(laplace, name, structure, delta, sigma):
    from torch.utils.data import DataLoader, TensorDataset

    model, _, X, y = PROBLEMS[name]
    rng, dtype = torch.random.get_rng_state(), torch.get_default_dtype()
    la = laplace.Laplace(
        model,
        "regression" if "regression" in name else "classification",
        subset_of_weights="last_layer",
        hessian_structure=structure,
        prior_precision=delta,
        sigma_noise=sigma if "regression" in name else 1.0,
    )
    torch.set_default_dtype(F64)  # laplace-torch builds the full GGN on torch.eye(D)
    try:
        la.fit(DataLoader(TensorDataset(X, y), batch_size=25, shuffle=False))
    finally:
        torch.set_default_dtype(dtype)
        torch.random.set_rng_state(rng)
    return la


def their_precision(la, structure):
    precision = la.posterior_precision
    if structure == "diag":
        return torch.diag(precision)
    if structure == "kron":
        return precision.to_matrix()
    return precision


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("problem", ["regression", "classification"])
def test_last_layer_matches_laplace_torch(laplace_torch, problem, structure):
    name = problem if structure != "kron" else f"{problem}-no-bias"
    la = fit_theirs(laplace_torch, name, structure, DELTA, SIGMA)
    mine = ours(name, STRUCTURES[structure], subset_of_weights="last_layer")
    last = PROBLEMS[name][0][-1]
    assert [id(p) for p in mine.params] == [id(p) for p in last.parameters()]
    assert torch.equal(mine._mean, la.mean)
    expected = their_precision(la, structure)
    assert torch.allclose(mine.posterior_precision().to_dense(), expected, rtol=RTOL, atol=0)
    X = PROBLEMS[name][2][:5]
    their_mean, their_cov = la._glm_predictive_distribution(X)
    mean, covariance = mine.predictive(X)
    assert torch.allclose(mean, their_mean, rtol=1e-12, atol=0)
    assert torch.allclose(covariance, their_cov, rtol=RTOL, atol=1e-14)
    for delta, sigma in HYPERPARAMETERS:
        sigma = sigma if "regression" in name else 1.0
        as_tensor = lambda value: torch.tensor(value, dtype=F64)  # noqa: E731
        # laplace-torch refuses a sigma_noise for classification, even 1
        their_sigma = as_tensor(sigma) if "regression" in name else None
        theirs = la.log_marginal_likelihood(as_tensor(delta), their_sigma).item()
        evidence = mine.log_marginal_likelihood(delta, sigma).item()
        assert evidence == pytest.approx(theirs, rel=RTOL), (delta, sigma)


# --- dense reference restricted to the subset --------------------------------------------


def dense_reference(name, indices, diagonal=False, inputs=5):
    """Return the evidence, ``P_S`` and ``J_S P_S⁻¹ J_Sᵀ`` per input, from dense matrices.

    ``diagonal``: ``G_SS`` replaced by its diagonal (the ``"diag"`` curvature).
    """
    model, loss_func, X, y = PROBLEMS[name]
    params = list(model.parameters())
    regression = "regression" in name
    sigma = SIGMA if regression else 1.0
    summed = type(loss_func)(reduction="sum")
    nll_scale = 0.5 if regression else 1.0  # MSELoss("sum") is twice the Gaussian NLL
    ggn = nll_scale * dense_ggn(model, summed, params, batches(X, y))[indices][:, indices]
    if diagonal:
        ggn = torch.diag(ggn.diagonal())
    theta = torch.cat([p.detach().flatten() for p in params])[indices]
    precision = ggn / sigma**2 + DELTA * torch.eye(len(indices), dtype=F64)
    with torch.no_grad():
        f = model(X)
    if regression:
        nll = ((f - y) ** 2).sum() / (2 * sigma**2) + 0.5 * f.numel() * math.log(
            2 * math.pi * sigma**2
        )
    else:
        nll = nn.functional.cross_entropy(f, y, reduction="sum")
    evidence = (
        -nll
        - 0.5 * DELTA * (theta**2).sum()
        + 0.5 * len(indices) * math.log(DELTA)
        - 0.5 * torch.logdet(precision)
    )
    outputs, jacobian = dense_jacobian(model, params, X[:inputs])
    rows = jacobian[:, indices]
    joint = rows @ torch.linalg.solve(precision, rows.T)
    C = outputs.shape[1]
    blocks = [joint[n * C : (n + 1) * C, n * C : (n + 1) * C] for n in range(inputs)]
    return evidence, precision, torch.stack(blocks)


def assert_matches_dense(laplace, name, indices, diagonal=False):
    evidence, precision, covariance = dense_reference(name, indices, diagonal)
    assert laplace.log_marginal_likelihood().item() == pytest.approx(evidence.item(), rel=RTOL)
    assert torch.allclose(laplace.posterior_precision().to_dense(), precision, rtol=RTOL, atol=0)
    _, predicted = laplace.predictive(PROBLEMS[name][2][:5])
    assert torch.allclose(predicted, covariance, rtol=1e-8, atol=1e-14)


def flat_positions(model, tensors):
    """Return the positions of ``tensors``' entries in ``parameters_to_vector(model)``."""
    offsets, start = {}, 0
    for p in model.parameters():
        offsets[id(p)] = start
        start += p.numel()
    return torch.cat([offsets[id(t)] + torch.arange(t.numel()) for t in tensors])


@pytest.mark.parametrize("curvature", ["full", "ggn"])
@pytest.mark.parametrize("problem", ["regression", "classification"])
def test_subnetwork_of_tensors_matches_the_dense_reference(problem, curvature):
    model = PROBLEMS[problem][0]
    chosen = [model[2].bias, model[0].weight]  # any order of whole tensors
    laplace = ours(problem, curvature, subset_of_weights="subnetwork", subnetwork=chosen)
    # the posterior is over the chosen tensors in the order given, as if they were params
    assert [id(p) for p in laplace.params] == [id(t) for t in chosen]
    assert_matches_dense(laplace, problem, flat_positions(model, laplace.params))


@pytest.mark.parametrize("curvature", ["full", "diag"])
@pytest.mark.parametrize("problem", ["regression", "classification"])
def test_subnetwork_of_indices_matches_the_dense_reference(problem, curvature):
    model = PROBLEMS[problem][0]
    D = sum(p.numel() for p in model.parameters())
    indices = torch.randperm(D, generator=torch.Generator().manual_seed(3))[:7]  # unsorted
    laplace = ours(problem, curvature, subset_of_weights="subnetwork", subnetwork=indices)
    assert laplace._mean.shape == (7,)
    assert_matches_dense(laplace, problem, indices, diagonal=curvature == "diag")
    samples = laplace.sample(3)
    assert samples.shape == (7, 3)


def test_a_boolean_mask_is_its_sorted_indices():
    model = PROBLEMS["classification"][0]
    D = sum(p.numel() for p in model.parameters())
    mask = torch.zeros(D, dtype=torch.bool)
    mask[[1, 5, D - 1]] = True
    by_mask = ours("classification", "full", subset_of_weights="subnetwork", subnetwork=mask)
    by_index = ours(
        "classification", "full", subset_of_weights="subnetwork", subnetwork=[1, 5, D - 1]
    )
    assert torch.equal(
        by_mask.posterior_precision().to_dense(), by_index.posterior_precision().to_dense()
    )
    assert_matches_dense(by_mask, "classification", torch.tensor([1, 5, D - 1]))


@pytest.mark.parametrize("curvature", ["full", "kfac", "ekfac", "diag", "ggn"])
def test_last_layer_is_the_posterior_over_its_parameters(curvature):
    model = PROBLEMS["regression"][0]
    last_layer = ours("regression", curvature, subset_of_weights="last_layer")
    tensors = list(model[2].parameters())
    explicit = ours("regression", curvature, subset_of_weights="subnetwork", subnetwork=tensors)
    assert last_layer.log_marginal_likelihood().item() == pytest.approx(
        explicit.log_marginal_likelihood().item(), rel=1e-12
    )
    if curvature == "full":
        assert_matches_dense(last_layer, "regression", flat_positions(model, tensors))


class HeadFirst(nn.Module):
    """Registers its head before its body, calls the body first, and ends without parameters."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.out = nn.Softplus()

    def forward(self, x):
        return self.out(self.head(self.body(x)))


def test_last_layer_is_the_last_module_run_that_owns_parameters():
    torch.manual_seed(0)
    model = HeadFirst().to(F64)
    X, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    params = list(model.parameters())
    laplace = cc.Laplace(
        model, nn.MSELoss(), params, [(X, y)], "full", subset_of_weights="last_layer"
    )
    assert [id(p) for p in laplace.params] == [id(model.head.weight), id(model.head.bias)]
    # only the chosen params count: without the head, the last layer is the body's Linear
    body = cc.Laplace(
        model, nn.MSELoss(), params[2:], [(X, y)], "full", subset_of_weights="last_layer"
    )
    assert [id(p) for p in body.params] == [id(p) for p in model.body[0].parameters()]


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subset", "subnetwork", "match"),
    [
        (
            "last-layer",
            None,
            "Unsupported subset_of_weights .*one of .all., .last_layer., .subnetwork.",
        ),
        ("all", [0, 1], "subnetwork goes with subset_of_weights='subnetwork'"),
        ("subnetwork", None, "subnetwork goes with subset_of_weights='subnetwork'"),
        ("subnetwork", [], "non-empty"),
        ("subnetwork", torch.tensor([], dtype=torch.long), "non-empty"),
        ("subnetwork", torch.tensor([0, 10_000]), "must lie in 0.."),
        ("subnetwork", torch.tensor([-1, 2]), "must lie in 0.."),
        ("subnetwork", torch.tensor([2, 3, 2]), "must not repeat"),
        ("subnetwork", torch.tensor([0.0, 1.0]), "must be integers"),
        ("subnetwork", torch.tensor([[0, 1]]), "1-D"),
        ("subnetwork", torch.zeros(5, dtype=torch.bool), "one entry per parameter"),
    ],
)
def test_bad_subsets_are_refused(subset, subnetwork, match):
    with pytest.raises(ValueError, match=match):
        ours("regression", "full", subset_of_weights=subset, subnetwork=subnetwork)


def test_subnetwork_tensors_must_be_entries_of_params():
    model, loss_func, X, y = PROBLEMS["regression"]
    copy = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"subnetwork\[0\].*not an entry of params"):
        ours("regression", "full", subset_of_weights="subnetwork", subnetwork=[copy])
    with pytest.raises(ValueError, match="more than once"):
        ours("regression", "full", subset_of_weights="subnetwork", subnetwork=[model[0].bias] * 2)
    empty_mask = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.bool)
    with pytest.raises(ValueError, match="selects no parameter"):
        ours("regression", "full", subset_of_weights="subnetwork", subnetwork=empty_mask)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "ggn", "lowrank", "symmetry"])
def test_curvatures_that_cannot_be_restricted_to_indices_raise(curvature):
    with pytest.raises(ValueError, match=f"curvature '{curvature}' cannot be restricted"):
        ours("regression", curvature, subset_of_weights="subnetwork", subnetwork=[0, 3])


def test_a_user_operator_must_have_the_subset_size():
    model, loss_func, X, y = PROBLEMS["regression"]
    whole = cc.KFAC(model, nn.MSELoss(reduction="sum"), list(model.parameters()), batches(X, y))
    with pytest.raises(ValueError, match="the posterior is over 9 parameters"):
        ours("regression", whole, subset_of_weights="last_layer")


class Scaled(nn.Module):
    """A parameter of a module with children: no module without children owns it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.ones((), dtype=F64))

    def forward(self, x):
        return self.scale * self.inner(x)


def test_params_that_no_layer_owns_have_no_last_layer():
    model, loss_func, X, y = PROBLEMS["regression"]
    scaled = Scaled(model)
    with pytest.raises(ValueError, match="found no layer owning an entry of params"):
        cc.Laplace(scaled, loss_func, [scaled.scale], batches(X, y), subset_of_weights="last_layer")


# --- JAX ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("jax_float64")
def test_jax_last_layer_and_indices_equal_torch():
    """The same subsets of the same weights give torch's evidence (few checks: JAX compiles)."""
    jnp = pytest.importorskip("jax.numpy")
    from jax.flatten_util import ravel_pytree

    model, _, X, y = PROBLEMS["regression"]
    names = ["w1", "b1", "w2", "b2"]
    params = {
        n: jnp.asarray(p.detach().numpy()) for n, p in zip(names, model.parameters(), strict=True)
    }

    def model_fn(p, x):
        return jnp.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    data = [(jnp.asarray(a.numpy()), jnp.asarray(b.numpy())) for a, b in batches(X, y)]
    options = {"prior_precision": DELTA, "sigma_noise": SIGMA, "curvature": "full"}
    mse = cc.losses.MSE()  # one loss object: its compiled programs are shared
    jax_last = cc.Laplace(model_fn, mse, params, data, subset_of_weights="last_layer", **options)
    torch_last = ours("regression", "full", subset_of_weights="last_layer")
    assert float(jax_last.log_marginal_likelihood()) == pytest.approx(
        torch_last.log_marginal_likelihood().item(), rel=RTOL
    )
    # torch flattens w1, b1, w2, b2; ravel_pytree sorts the keys: b1, b2, w1, w2
    offsets = np.cumsum([0] + [p.numel() for p in model.parameters()])
    torch_position = {
        n: jnp.arange(start, start + p.numel()).reshape(p.shape)
        for n, start, p in zip(names, offsets, model.parameters(), strict=False)
    }
    jax_to_torch = np.asarray(ravel_pytree(torch_position)[0])
    torch_indices = np.array([0, 9, 20, 24, 7])
    jax_indices = np.array([int(np.flatnonzero(jax_to_torch == i)[0]) for i in torch_indices])
    jax_subnet = cc.Laplace(
        model_fn,
        mse,
        params,
        data,
        subset_of_weights="subnetwork",
        subnetwork=jnp.asarray(jax_indices),
        **options,
    )
    torch_subnet = ours(
        "regression", "full", subset_of_weights="subnetwork", subnetwork=torch_indices
    )
    assert float(jax_subnet.log_marginal_likelihood()) == pytest.approx(
        torch_subnet.log_marginal_likelihood().item(), rel=RTOL
    )
