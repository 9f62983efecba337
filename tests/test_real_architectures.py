"""Matrix-free operators on real architectures (tiny GPTs, a tiny ResNet) are exact.

References come from ``tests/double_backward_reference.py`` (reverse-mode autograd one
vector at a time; no ``vmap`` of forward-mode AD, which torch 2.13 gets wrong on LayerNorm).
"""

import logging

import pytest
import torch
from torch import nn

import cola_curvature as cc
from cola_curvature.models import GPT, GPTConfig, ResNet
from tests import double_backward_reference as ref
from tests.cases import F64
from tests.reference import flat_params_and_unflatten

RTOL = 1e-9
SPLIT = (3, 2, 1)


def tiny_gpt(**options):
    config = GPTConfig(vocab_size=7, context=4, n_layer=1, n_head=2, n_embd=4, **options)
    return GPT(config).to(F64).eval()


def tiny_resnet():
    model = ResNet("basic", (1, 1), num_classes=3, width=2, small_input=True).to(F64)
    with torch.no_grad():  # non-trivial running statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


MODELS = {
    "gpt-sdpa-tied": lambda: tiny_gpt(),
    "gpt-mha": lambda: tiny_gpt(attention="mha", tie_weights=False),
    "resnet-bn-eval": tiny_resnet,
    "gpt-mha-weights-seqfirst": lambda: tiny_gpt(
        attention="mha", need_weights=True, batch_first=False
    ),
    "gpt-rmsnorm": lambda: tiny_gpt(norm="rmsnorm"),
}
MAIN_MODELS = ("gpt-sdpa-tied", "gpt-mha", "resnet-bn-eval")


def build(name, reduction, models=MODELS):
    """Return ``(model, loss, params, data)`` with 6 examples in uneven batches.

    ``models`` maps names to constructors; a name starting with ``gpt`` gets token data.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = models[name]()
        if name.startswith("gpt"):
            X, y = torch.randint(0, 7, (6, 4)), torch.randint(0, 7, (6, 4))
        else:
            X, y = torch.randn(6, 3, 6, 6, dtype=F64), torch.randint(0, 3, (6,))
    data = list(zip(X.split(SPLIT), y.split(SPLIT), strict=True))
    return model, nn.CrossEntropyLoss(reduction=reduction), list(model.parameters()), data


PROBLEMS = [(name, reduction) for name in MAIN_MODELS for reduction in ("mean", "sum")]
PROBLEMS += [(name, "mean") for name in MODELS if name not in MAIN_MODELS]


@pytest.fixture(scope="module", params=PROBLEMS, ids=[f"{m}-{r}" for m, r in PROBLEMS])
def problem_and_references(request):
    name, reduction = request.param
    problem = build(name, reduction)
    references = {
        cc.GGN: ref.dense_ggn(*problem),
        cc.Hessian: ref.dense_hessian(*problem),
    }
    if name in MAIN_MODELS:
        references[cc.EmpiricalFisher] = ref.dense_empirical_fisher(*problem)
    return problem, references


def assert_close(actual, expected):
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= RTOL * scale, (actual - expected).abs().max() / scale


def test_operators_equal_double_backward_references(problem_and_references):
    problem, references = problem_and_references
    params = problem[2]
    D = sum(p.numel() for p in params)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        V = torch.randn(D, 3, dtype=F64)
    _, unflatten = flat_params_and_unflatten(params)
    for operator_type, dense in references.items():
        operator = operator_type(*problem)
        assert_close(operator @ V[:, 0], dense @ V[:, 0])
        assert_close(operator @ V, dense @ V)
        shaped = operator @ [t.clone() for t in unflatten(V[:, 1])]
        assert_close(torch.cat([t.reshape(-1) for t in shaped]), dense @ V[:, 1])


def test_fused_attention_model_gives_the_same_matrix_as_its_math_twin():
    """``need_weights=False`` runs the fused kernel in user code; the operators match ``True``."""
    fused, loss, params, data = build("gpt-mha", "sum")
    twin = tiny_gpt(attention="mha", tie_weights=False, need_weights=True)
    twin.load_state_dict(fused.state_dict())
    V = torch.randn(sum(p.numel() for p in params), 2, dtype=F64)
    for operator_type in (cc.GGN, cc.Hessian, cc.EmpiricalFisher):
        first = operator_type(fused, loss, params, data) @ V
        second = operator_type(twin, loss, list(twin.parameters()), data) @ V
        assert_close(first, second)


def test_hessian_reference_agrees_with_finite_differences():
    model, loss, params, data = build("gpt-sdpa-tied", "sum")
    exact = ref.dense_hessian(model, loss, params, data)
    approximate = ref.finite_difference_hessian(model, loss, params, data, step=1e-5)
    assert (exact - approximate).abs().max() <= 1e-6 * exact.abs().max()


class SmoothTanh(torch.autograd.Function):
    """``tanh`` with a backward in differentiable ops and no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class OnceTanh(SmoothTanh):
    """The same with a backward that autograd cannot differentiate."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class CustomMLP(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.first, self.second = nn.Linear(4, 5), nn.Linear(5, 3)
        self.activation = activation

    def forward(self, x):
        return self.second(self.activation(self.first(x)))


def custom_problem(function):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CustomMLP(function.apply).to(F64).eval()
        twin = CustomMLP(torch.tanh).to(F64).eval()
        twin.load_state_dict(model.state_dict())
        X, y = torch.randn(7, 4, dtype=F64), torch.randint(0, 3, (7,))
    data = list(zip(X.split((4, 3)), y.split((4, 3)), strict=True))
    return model, twin, nn.CrossEntropyLoss(), data


@pytest.mark.parametrize("operator_type", [cc.GGN, cc.EmpiricalFisher, cc.Hessian])
def test_custom_function_without_forward_ad_takes_the_reverse_route(operator_type, caplog):
    model, twin, loss, data = custom_problem(SmoothTanh)
    V = torch.randn(43, 2, dtype=F64)
    with caplog.at_level(logging.DEBUG, logger="cola_curvature"):
        product = operator_type(model, loss, list(model.parameters()), data) @ V
    expected = operator_type(twin, loss, list(twin.parameters()), data) @ V
    assert_close(product, expected)
    if operator_type is not cc.Hessian:
        assert "reverse mode" in caplog.text


@pytest.mark.parametrize("operator_type", [cc.GGN, cc.Hessian])
def test_once_differentiable_function_is_refused_not_zeroed(operator_type):
    model, _, loss, data = custom_problem(OnceTanh)
    with pytest.raises(NotImplementedError, match="once_differentiable"):
        operator_type(model, loss, list(model.parameters()), data) @ torch.ones(43, dtype=F64)


@pytest.mark.parametrize("method", ["probit", "mc"])
def test_laplace_on_a_language_model_gives_class_probabilities_per_position(method):
    model, loss, params, data = build("gpt-sdpa-tied", "sum")
    laplace = cc.Laplace(model, loss, params, data, curvature="diag")
    inputs = data[0][0]
    probabilities = laplace.predictive_probabilities(inputs, method=method)
    assert probabilities.shape == (inputs.shape[0], 7, inputs.shape[1])
    sums = probabilities.sum(1)
    assert (sums - 1).abs().max() <= 1e-12


def test_kfac_gives_a_tied_weight_its_exact_block_when_asked():
    """``shared_weights="uncovered"`` leaves the tied tensor to ``uncovered``: its exact block."""
    model, loss, params, data = build("gpt-sdpa-tied", "sum")
    with pytest.raises(ValueError, match="wte.weight.*shared_weights='uncovered'"):
        cc.KFAC(model, loss, params, data, shared_weights="uncovered")
    options = {"uncovered": "dense", "shared_weights": "uncovered"}
    kfac = cc.KFAC(model, loss, params, data, **options).to_dense()
    ggn = ref.dense_ggn(model, loss, params, data)
    size = model.wte.weight.numel()  # the first entry of params
    assert_close(kfac[:size, :size], ggn[:size, :size])


@pytest.mark.parametrize("name", ["gpt-sdpa-tied", "gpt-mha"])
def test_kfac_laplace_on_a_language_model_fits_its_prior(name):
    """``curvature="kfac"`` with ``uncovered="diagonal"``: the evidence equals the dense one."""
    model, loss, params, data = build(name, "sum")
    laplace = cc.Laplace(model, loss, params, data, curvature="kfac", uncovered="diagonal")
    H = laplace.curvature.to_dense()
    D = H.shape[0]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def dense_evidence(delta):
        precision = H + delta * torch.eye(D, dtype=F64)
        return (
            laplace.log_likelihood()
            - 0.5 * delta * theta @ theta
            + 0.5 * D * torch.log(torch.tensor(delta, dtype=F64))
            - 0.5 * torch.logdet(precision)
        )

    before = laplace.log_marginal_likelihood()
    assert_close(before, dense_evidence(1.0))
    laplace.optimize_prior_precision(steps=20)
    assert laplace.log_marginal_likelihood() > before
    delta = float(laplace.prior_precision)
    assert_close(laplace.log_marginal_likelihood(), dense_evidence(delta))
