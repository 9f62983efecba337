"""Hessian, GGN, empirical Fisher and MC Fisher against dense references, on every case."""

import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests._tols import EXACT_RTOL, MC_RTOL
from tests.reference import (
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    flat_params_and_unflatten,
)

F64 = torch.float64
OPERATORS = {
    "hessian": (cc.Hessian, dense_hessian),
    "ggn": (cc.GGN, dense_ggn),
    "empirical-fisher": (cc.EmpiricalFisher, dense_empirical_fisher),
}


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("operator_name", OPERATORS)
def test_dense_form_matches_the_reference(problem, operator_name):
    operator_type, reference = OPERATORS[operator_name]
    model, loss_func, params, data = problem
    operator = operator_type(model, loss_func, params, data)
    expected = reference(model, loss_func, params, data)
    identity = torch.eye(operator.shape[0], dtype=F64)
    assert relative_error(operator @ identity, expected) < EXACT_RTOL


@pytest.mark.parametrize("operator_name", OPERATORS)
def test_vector_matrix_and_parameter_shaped_products_agree(problem, operator_name):
    operator_type, _ = OPERATORS[operator_name]
    model, loss_func, params, data = problem
    operator = operator_type(model, loss_func, params, data)
    generator = torch.Generator().manual_seed(1)
    V = torch.randn(operator.shape[0], 3, dtype=F64, generator=generator)
    matrix_product = operator @ V
    for i in range(3):
        assert relative_error(operator @ V[:, i], matrix_product[:, i]) < EXACT_RTOL
    _, unflatten = flat_params_and_unflatten(params)
    shaped = operator @ unflatten(V[:, 0])
    assert [t.shape for t in shaped] == [p.shape for p in params]
    flat = torch.cat([t.flatten() for t in shaped])
    assert relative_error(flat, matrix_product[:, 0]) < EXACT_RTOL


def test_reference_agrees_with_independent_closed_forms():
    """The references themselves can fail: GGN = Hessian = 2 Xᵀ X ⊗ I for a linear MSE model."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).to(F64)
    X, Y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    data, loss_func = [(X, Y)], nn.MSELoss(reduction="sum")
    params = list(model.parameters())
    closed_form = torch.kron(torch.eye(2, dtype=F64), 2 * X.T @ X)
    assert relative_error(dense_ggn(model, loss_func, params, data), closed_form) < EXACT_RTOL
    assert relative_error(dense_hessian(model, loss_func, params, data), closed_form) < EXACT_RTOL
    residual = X @ model.weight.detach().T - Y
    gradients = torch.stack([torch.kron(2 * residual[n], X[n]) for n in range(6)])
    expected_ef = gradients.T @ gradients
    assert (
        relative_error(dense_empirical_fisher(model, loss_func, params, data), expected_ef)
        < EXACT_RTOL
    )


def tiny_classifier():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).to(F64)
    X, y = torch.randn(6, 2, dtype=F64), torch.randint(0, 3, (6,))
    return model, nn.CrossEntropyLoss(), list(model.parameters()), [(X[:4], y[:4]), (X[4:], y[4:])]


def test_mc_fisher_converges_to_the_ggn():
    model, loss_func, params, data = tiny_classifier()
    ggn = dense_ggn(model, loss_func, params, data)
    few = cc.FisherMC(model, loss_func, params, data, mc_samples=1, seed=0).to_dense()
    many = cc.FisherMC(model, loss_func, params, data, mc_samples=4000, seed=0).to_dense()
    assert relative_error(many, ggn) < MC_RTOL
    assert relative_error(many, ggn) < relative_error(few, ggn) / 5


def test_mc_fisher_is_one_fixed_matrix_per_seed():
    model, loss_func, params, data = tiny_classifier()
    first = cc.FisherMC(model, loss_func, params, data, mc_samples=2, seed=5)
    again = cc.FisherMC(model, loss_func, params, data, mc_samples=2, seed=5)
    other = cc.FisherMC(model, loss_func, params, data, mc_samples=2, seed=6)
    dense = first.to_dense()
    assert torch.equal(dense, again.to_dense())
    assert torch.equal(dense, first.to_dense())
    assert not torch.allclose(dense, other.to_dense())
    assert torch.allclose(dense, dense.T, atol=1e-14)
    assert torch.linalg.eigvalsh(dense).min() > -1e-12
