"""Hessian, GGN, empirical Fisher and MC Fisher against dense float64 references."""

import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests._tols import DETERMINISM_ATOL, EXACT_RTOL, MC_IMPROVEMENT, MC_RTOL, PSD_RTOL
from tests.cases import CASES, F64
from tests.reference import (
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    flat_params_and_unflatten,
)

OPERATORS = {
    "hessian": (cc.Hessian, dense_hessian),
    "ggn": (cc.GGN, dense_ggn),
    "empirical-fisher": (cc.EmpiricalFisher, dense_empirical_fisher),
}
SPLIT_CASES = [case for case in CASES if case.batching != "one"]
_REFERENCES = {}


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def reference_matrix(case, operator_name, problem):
    """The dense reference of ``case``, computed once per session."""
    key = (case, operator_name)
    if key not in _REFERENCES:
        _REFERENCES[key] = OPERATORS[operator_name][1](*problem)
    return _REFERENCES[key]


@pytest.mark.parametrize("operator_name", OPERATORS)
def test_dense_form_matches_the_reference(case, problem, options, operator_name):
    operator = OPERATORS[operator_name][0](*problem, **options)
    expected = reference_matrix(case, operator_name, problem)
    identity = torch.eye(operator.shape[0], dtype=F64)
    assert relative_error(operator @ identity, expected) < EXACT_RTOL
    assert relative_error(operator.to_dense(), expected) < EXACT_RTOL


@pytest.mark.parametrize("operator_name", OPERATORS)
def test_vector_matrix_and_parameter_shaped_products_agree(case, problem, options, operator_name):
    operator = OPERATORS[operator_name][0](*problem, **options)
    expected = reference_matrix(case, operator_name, problem)
    params = problem[2]
    V = torch.randn(operator.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    matrix_product = operator @ V
    assert matrix_product.shape == V.shape
    assert matrix_product.dtype == F64
    assert relative_error(matrix_product, expected @ V) < EXACT_RTOL
    for i in range(3):
        vector_product = operator @ V[:, i]
        assert vector_product.shape == (operator.shape[0],)
        assert relative_error(vector_product, matrix_product[:, i]) < EXACT_RTOL
    _, unflatten = flat_params_and_unflatten(params)
    shaped = operator @ unflatten(V[:, 0])
    assert isinstance(shaped, list)
    assert [t.shape for t in shaped] == [p.shape for p in params]
    assert all(t.dtype == F64 for t in shaped)
    flat = torch.cat([t.flatten() for t in shaped])
    assert relative_error(flat, matrix_product[:, 0]) < EXACT_RTOL
    assert relative_error(flat, expected @ V[:, 0]) < EXACT_RTOL


@pytest.mark.parametrize("operator_name", OPERATORS)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c.id for c in SPLIT_CASES], indirect=True)
def test_batching_does_not_change_the_products(case, problem, options, operator_name):
    """Uneven batches (7 + 5 + 3, also as dict inputs) give the products of one batch."""
    operator_type = OPERATORS[operator_name][0]
    split = operator_type(*problem, **options)
    one = operator_type(*case.with_batching("one").build())
    V = torch.randn(split.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    assert relative_error(split @ V, one @ V) < EXACT_RTOL


# --- Monte-Carlo Fisher ------------------------------------------------------------------


def tiny_problem(loss, reduction, sequence=False):
    """A 2-3-C network on 6 examples in two uneven batches (D = 21 or 15)."""
    torch.manual_seed(3)
    C = 3 if loss == "ce" else 2
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, C)).to(F64).eval()
    X = torch.randn(6, 2, 2, dtype=F64) if sequence else torch.randn(6, 2, dtype=F64)
    if sequence and loss == "ce":
        model.append(Permute())
    with torch.no_grad():
        f = model(X)
    if loss == "ce":
        y = torch.randint(0, C, (f.shape[0],) + tuple(f.shape[2:]))
    elif loss == "bce":
        y = torch.rand(f.shape, dtype=F64)
    else:
        y = torch.randn(f.shape, dtype=F64)
    loss_func = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}[loss]
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    return model, loss_func(reduction=reduction), list(model.parameters()), data


class Permute(nn.Module):
    """``(N, T, C) → (N, C, T)`` for cross-entropy over a sequence."""

    def forward(self, x):
        return x.permute(0, 2, 1)


MC_PROBLEMS = {
    "ce-mean": ("ce", "mean", False),
    "ce-sum": ("ce", "sum", False),
    "ce-mean-sequence": ("ce", "mean", True),
    "mse-sum": ("mse", "sum", False),
    "mse-mean": ("mse", "mean", False),
    "bce-mean": ("bce", "mean", False),
}


@pytest.mark.parametrize("name", MC_PROBLEMS)
def test_mc_fisher_converges_to_the_ggn(name):
    problem = tiny_problem(*MC_PROBLEMS[name])
    ggn = dense_ggn(*problem)
    few = cc.FisherMC(*problem, mc_samples=1, seed=0).to_dense()
    many = cc.FisherMC(*problem, mc_samples=2000, seed=0).to_dense()
    error_many, error_few = relative_error(many, ggn), relative_error(few, ggn)
    assert error_many < MC_RTOL, (error_many, error_few)
    assert error_many < error_few / MC_IMPROVEMENT, (error_many, error_few)


def test_mc_fisher_is_one_fixed_psd_matrix_per_seed():
    problem = tiny_problem("ce", "mean")
    first = cc.FisherMC(*problem, mc_samples=2, seed=5)
    again = cc.FisherMC(*problem, mc_samples=2, seed=5)
    other = cc.FisherMC(*problem, mc_samples=2, seed=6)
    dense = first.to_dense()
    assert (dense - again.to_dense()).abs().max() <= DETERMINISM_ATOL
    assert (dense - first.to_dense()).abs().max() <= DETERMINISM_ATOL
    assert relative_error(other.to_dense(), dense) > 1e-3
    assert relative_error(dense.T, dense) < EXACT_RTOL
    eigenvalues = torch.linalg.eigvalsh(dense)
    assert eigenvalues.min() >= -PSD_RTOL * eigenvalues.abs().max()


def test_mc_fisher_does_not_depend_on_the_global_seed():
    problem = tiny_problem("bce", "sum")
    operator = cc.FisherMC(*problem, mc_samples=3, seed=1)
    v = torch.randn(operator.shape[0], dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(100)
    first = operator @ v
    torch.manual_seed(200)
    assert (operator @ v - first).abs().max() <= DETERMINISM_ATOL
