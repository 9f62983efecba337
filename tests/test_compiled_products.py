"""``compile=True``: torch.compile'd products against the eager products and dense references."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests._tols import EXACT_RTOL
from tests.reference import dense_empirical_fisher, dense_ggn, dense_hessian

F64 = torch.float64
OPERATORS = {
    "ggn": (cc.GGN, dense_ggn),
    "empirical-fisher": (cc.EmpiricalFisher, dense_empirical_fisher),
    "hessian": (cc.Hessian, dense_hessian),
}


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def problem():
    """A tiny float64 MLP, mean cross-entropy, two batches of one shape (one compilation)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    X = torch.randn(8, 5, dtype=F64)
    y = torch.randint(0, 3, (8,))
    return model, nn.CrossEntropyLoss(), list(model.parameters()), [(X[:4], y[:4]), (X[4:], y[4:])]


@pytest.fixture(scope="module")
def columns(problem):
    num_params = sum(p.numel() for p in problem[2])
    return torch.randn(num_params, 2, dtype=F64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", OPERATORS)
def test_compiled_products_match_eager_and_dense_reference(problem, columns, name):
    operator, reference = OPERATORS[name]
    compiled = operator(*problem, compile=True, check_deterministic=False)
    eager = operator(*problem, check_deterministic=False)
    product = compiled @ columns
    assert relative_error(product, reference(*problem) @ columns) < EXACT_RTOL
    assert relative_error(product, eager @ columns) < EXACT_RTOL
    assert relative_error(compiled @ columns, product) < EXACT_RTOL  # the cached program


def test_compiled_products_check_targets(problem):
    model, loss_func, params, data = problem
    bad = [(data[0][0], torch.full((4,), 3))]  # labels outside [0, 3)
    with pytest.raises(ValueError, match="labels must lie in"):
        cc.GGN(model, loss_func, params, bad, compile=True)


@pytest.mark.parametrize("operator", [cc.FisherMC, cc.GradientMoments])
def test_operators_without_a_compiled_route_refuse_compile(problem, operator):
    with pytest.raises(NotImplementedError, match=f"{operator.__name__} has no compile=True"):
        operator(*problem, compile=True)


def test_jax_accepts_compile_and_changes_nothing():
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)))
    data = [(jnp.asarray(np.random.default_rng(1).normal(size=(4, 3))), jnp.asarray([0, 1, 1, 0]))]
    loss = cc.losses.CrossEntropy()
    args = (lambda w, x: x @ w, loss, weights, data)
    v = jnp.arange(6.0)
    assert np.allclose(cc.GGN(*args, compile=True) @ v, cc.GGN(*args) @ v, rtol=0, atol=0)


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _SquaredLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2).to(F64)

    def forward(self, x):
        return _Square.apply(self.linear(x))


@pytest.mark.parametrize("operator", [cc.GGN, cc.Hessian])
def test_compile_refuses_custom_autograd_functions(operator):
    model = _SquaredLinear()
    data = [(torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,)))]
    with pytest.raises(NotImplementedError, match="_Square"):
        operator(model, nn.CrossEntropyLoss(), list(model.parameters()), data, compile=True)
