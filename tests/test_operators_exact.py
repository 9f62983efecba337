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
    empirical_fisher_matmat,
    flat_params_and_unflatten,
    ggn_matmat,
    hessian_matmat,
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


def inplace_relu_model():
    """In-place ReLU: operations that overwrite their input."""
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))


def non_contiguous_model():
    """A weight whose storage is transposed (``Parameter(W.T)``): flatten is logical."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].weight = nn.Parameter(torch.randn(4, 6).T)
    assert not model[0].weight.is_contiguous()
    return model


def batch_norm_eval_model():
    """Batch norm in eval mode: its running statistics are constants of the model."""
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


def conv_padding_avgpool_model():
    """Conv2d with stride and padding, average pooling, a 1×1 conv and a flatten."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 2, 1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


SPECIAL_MODELS = {
    "inplace-relu": (inplace_relu_model, (4,)),
    "non-contiguous": (non_contiguous_model, (4,)),
    "batchnorm-eval": (batch_norm_eval_model, (4,)),
    "conv-padding-avgpool": (conv_padding_avgpool_model, (2, 8, 8)),
}


@pytest.mark.parametrize("operator_name", OPERATORS)
@pytest.mark.parametrize("model_name", SPECIAL_MODELS)
def test_special_models_with_one_two_and_three_columns(model_name, operator_name):
    build, input_shape = SPECIAL_MODELS[model_name]
    with torch.random.fork_rng():
        torch.manual_seed(6)
        model = build().to(F64).eval()
        X, y = torch.randn(10, *input_shape, dtype=F64), torch.randint(0, 3, (10,))
    params = list(model.parameters())
    problem = (model, nn.CrossEntropyLoss(), params, [(X[:6], y[:6]), (X[6:], y[6:])])
    operator_type, reference = OPERATORS[operator_name]
    expected = reference(*problem)
    operator = operator_type(*problem)
    V = torch.randn(operator.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    for columns in ([0], [0, 1], [0, 1, 2]):
        assert relative_error(operator @ V[:, columns], expected @ V[:, columns]) < EXACT_RTOL
    assert relative_error(operator @ V[:, 0], expected @ V[:, 0]) < EXACT_RTOL
    _, unflatten = flat_params_and_unflatten(params)
    shaped = torch.cat([t.flatten() for t in operator @ unflatten(V[:, 1])])
    assert relative_error(shaped, expected @ V[:, 1]) < EXACT_RTOL


MATMAT_REFERENCES = {
    "hessian": hessian_matmat,
    "ggn": ggn_matmat,
    "empirical-fisher": empirical_fisher_matmat,
}


@pytest.mark.parametrize("operator_name", OPERATORS)
def test_many_columns_on_a_wide_model(operator_name):
    """D = 65539, 40 columns, MiB-sized tangents: against matrix-free references.

    Large products may take other code paths than the tiny cases (e.g. columns batched
    only below a memory budget, so here one batch of 9 may be batched differently from the
    batch of 6); the result must not depend on that.
    """
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(4, 8192), nn.Tanh(), nn.Linear(8192, 3)).to(F64).eval()
        X, y = torch.randn(15, 4, dtype=F64), torch.randint(0, 3, (15,))
    params = list(model.parameters())
    problem = (model, nn.CrossEntropyLoss(), params, [(X[:9], y[:9]), (X[9:], y[9:])])
    operator = OPERATORS[operator_name][0](*problem)
    V = torch.randn(operator.shape[0], 40, dtype=F64, generator=torch.Generator().manual_seed(5))
    product = operator @ V
    reference = MATMAT_REFERENCES[operator_name]
    assert relative_error(product[:, [0, 1, 39]], reference(*problem, V[:, [0, 1, 39]])) < (
        EXACT_RTOL
    )
    assert relative_error(product[:, 20], operator @ V[:, 20]) < EXACT_RTOL


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
