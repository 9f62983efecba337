"""The operator contract: shape, dtype, annotations, SciPy, determinism, untouched user state."""

import cola
import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

import cola_curvature as cc
from tests._state import assert_unchanged, snapshot
from tests._tols import DETERMINISM_ATOL, EXACT_RTOL, SCIPY_RTOL
from tests.cases import F64, Case
from tests.reference import (
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    flat_params_and_unflatten,
)

MATRIX_FREE = [cc.Hessian, cc.GGN, cc.EmpiricalFisher, cc.FisherMC]
ALL_OPERATORS = MATRIX_FREE + [cc.KFAC, cc.EKFAC]
CONTRACT_CASE = Case("cnn", "ce", "mean", "uneven")
SUBSET_CASE = Case("subset", "ce", "mean", "uneven")


def by_name(operator_type):
    return operator_type.__name__


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def random_matrix(operator, k, seed=1, dtype=F64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(operator.shape[1], k, generator=generator).to(dtype)


@pytest.mark.parametrize("operator_type", ALL_OPERATORS, ids=by_name)
def test_shape_dtype_and_annotations(operator_type):
    model, loss_func, params, data = CONTRACT_CASE.build()
    operator = operator_type(model, loss_func, params, data)
    D = sum(p.numel() for p in params)
    assert operator.shape == (D, D)
    assert operator.dtype == F64
    assert operator.isa(cola.SelfAdjoint)
    if operator_type is cc.Hessian:
        assert cola.SelfAdjoint in operator.annotations
        assert not operator.isa(cola.PSD)
    else:
        assert cola.PSD in operator.annotations
        assert operator.isa(cola.PSD)


@pytest.mark.parametrize("operator_type", MATRIX_FREE, ids=by_name)
def test_a_parameter_subset_sets_the_size_and_the_flattening_order(operator_type):
    model, loss_func, params, data = SUBSET_CASE.build()
    operator = operator_type(model, loss_func, params, data)
    D = model[2].weight.numel() + model[0].bias.numel()
    assert operator.shape == (D, D) == (20, 20)
    V = random_matrix(operator, 2)
    _, unflatten = flat_params_and_unflatten(params)
    shaped = operator @ unflatten(V[:, 0])
    assert [t.shape for t in shaped] == [(3, 5), (5,)]
    assert relative_error(torch.cat([t.flatten() for t in shaped]), (operator @ V)[:, 0]) < (
        EXACT_RTOL
    )


@pytest.mark.parametrize("operator_type", MATRIX_FREE, ids=by_name)
def test_float32_parameters_give_a_float32_operator(operator_type):
    model, loss_func, params, data = Case("mlp", "mse", "mean", "uneven").build()
    model = model.float()
    data = [(x.float(), y.float()) for x, y in data]
    operator = operator_type(model, loss_func, params, data)
    assert operator.dtype == torch.float32
    V = random_matrix(operator, 2, dtype=torch.float32)
    assert (operator @ V).dtype == torch.float32
    assert (operator @ V[:, 0]).dtype == torch.float32


@pytest.mark.parametrize("operator_type", ALL_OPERATORS, ids=by_name)
def test_to_scipy_agrees_with_matmul(operator_type):
    model, loss_func, params, data = CONTRACT_CASE.build()
    operator = operator_type(model, loss_func, params, data)
    scipy_operator = operator.to_scipy()
    V = random_matrix(operator, 2)
    expected = (operator @ V).numpy()
    assert isinstance(scipy_operator, scipy.sparse.linalg.LinearOperator)
    assert scipy_operator.shape == operator.shape
    assert scipy_operator.dtype == np.float64
    vector = scipy_operator @ V[:, 0].numpy()
    matrix = scipy_operator.matmat(V.numpy())
    assert isinstance(vector, np.ndarray)
    assert vector.shape == (operator.shape[0],)
    assert isinstance(matrix, np.ndarray)
    assert np.linalg.norm(vector - expected[:, 0]) <= SCIPY_RTOL * np.linalg.norm(expected[:, 0])
    assert np.linalg.norm(matrix - expected) <= SCIPY_RTOL * np.linalg.norm(expected)
    assert np.linalg.norm(scipy_operator.matvec(V[:, 1].numpy()) - expected[:, 1]) <= (
        SCIPY_RTOL * np.linalg.norm(expected[:, 1])
    )


@pytest.mark.parametrize("operator_type", MATRIX_FREE, ids=by_name)
def test_products_are_deterministic_and_work_without_grad(operator_type):
    model, loss_func, params, data = CONTRACT_CASE.build()
    operator = operator_type(model, loss_func, params, data)
    V = random_matrix(operator, 2)
    first = operator @ V
    assert (operator @ V - first).abs().max() <= DETERMINISM_ATOL
    with torch.no_grad():
        without_grad = operator @ V
    assert (without_grad - first).abs().max() <= DETERMINISM_ATOL
    assert torch.is_grad_enabled()
    with torch.no_grad():
        built_without_grad = operator_type(model, loss_func, params, data)
    assert (built_without_grad @ V - first).abs().max() <= DETERMINISM_ATOL


class BatchNormNet(nn.Module):
    """Linear, batch norm, dropout (p=0) and a head; ``head.bias`` is frozen."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.dropout = nn.Dropout(0.0)
        self.head = nn.Linear(4, 2)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        return self.head(self.dropout(torch.tanh(self.norm(self.linear(x)))))


def batch_norm_problem(train):
    """A BatchNormNet in eval mode, or in train mode with its batch norm left in eval.

    Batch norm in train mode is refused (see ``tests/test_reliability.py``); the train
    variant checks that mixed train/eval flags survive.
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BatchNormNet().to(F64)
        X, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))
    with torch.no_grad():  # non-trivial running statistics
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    model.train(train)
    if train:
        model.norm.eval()  # mixed flags must survive too
    params = [model.linear.weight, model.linear.bias, model.head.weight]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)
    return model, nn.CrossEntropyLoss(), params, loader


def exercise(operator, params):
    """Every kind of product the contract offers."""
    D = operator.shape[0]
    _, unflatten = flat_params_and_unflatten(params)
    v = torch.linspace(-1, 1, D, dtype=F64)
    operator @ v
    operator @ torch.stack([v, v.flip(0)], dim=1)
    operator @ unflatten(v)
    operator.to_dense()
    operator.to_scipy().matvec(v.numpy())


@pytest.mark.parametrize(
    "train", [False, True], ids=["eval-batchnorm", "train-batchnorm-unchecked"]
)
@pytest.mark.parametrize("operator_type", ALL_OPERATORS, ids=by_name)
def test_user_state_is_untouched(operator_type, train):
    model, loss_func, params, data = batch_norm_problem(train)
    np.random.seed(7)
    before = snapshot(model)
    operator = operator_type(model, loss_func, params, data, check_deterministic=not train)
    assert_unchanged(before, model)
    exercise(operator, params)
    assert_unchanged(before, model)


def test_train_mode_batchnorm_products_leave_running_stats_alone():
    model, loss_func, params, data = batch_norm_problem(train=True)
    running_mean = model.norm.running_mean.clone()
    running_var = model.norm.running_var.clone()
    batches_tracked = model.norm.num_batches_tracked.clone()
    operator = cc.GGN(model, loss_func, params, data, check_deterministic=False)
    for _ in range(3):
        operator @ torch.ones(operator.shape[0], dtype=F64)
    assert torch.equal(model.norm.running_mean, running_mean)
    assert torch.equal(model.norm.running_var, running_var)
    assert torch.equal(model.norm.num_batches_tracked, batches_tracked)


@pytest.mark.parametrize("frozen", ["one-frozen", "all-frozen"])
@pytest.mark.parametrize("operator_type", [cc.Hessian, cc.GGN, cc.EmpiricalFisher], ids=by_name)
def test_frozen_parameters_in_params_get_their_curvature(operator_type, frozen):
    """``requires_grad=False`` on listed parameters neither breaks nor zeroes the result."""
    model, loss_func, params, data = batch_norm_problem(train=False)
    if frozen == "all-frozen":
        model.requires_grad_(False)
    else:
        model.linear.bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    reference = {
        cc.Hessian: dense_hessian,
        cc.GGN: dense_ggn,
        cc.EmpiricalFisher: dense_empirical_fisher,
    }[operator_type]
    expected = reference(model, loss_func, params, data)
    operator = operator_type(model, loss_func, params, data)
    assert relative_error(operator.to_dense(), expected) < EXACT_RTOL
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("operator_type", MATRIX_FREE, ids=by_name)
def test_inference_mode_never_gives_a_silently_wrong_product(operator_type):
    """Inside ``torch.inference_mode()`` a product is right, or fails naming the mode."""
    model, loss_func, params, data = CONTRACT_CASE.build()
    operator = operator_type(model, loss_func, params, data)
    V = random_matrix(operator, 2)
    expected = operator @ V
    try:
        with torch.inference_mode():
            result = operator @ V
    except (RuntimeError, ValueError) as error:
        assert "inference" in str(error).lower(), error
    else:
        assert relative_error(result, expected) < EXACT_RTOL


@pytest.mark.parametrize("operator_type", MATRIX_FREE, ids=by_name)
def test_a_dataloader_gives_the_products_of_the_same_list(operator_type):
    model, loss_func, params, data = Case("mlp", "bce", "mean", "one").build()
    X, y = data[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    from_loader = operator_type(model, loss_func, params, loader)
    from_list = operator_type(model, loss_func, params, data)
    V = random_matrix(from_list, 2)
    assert relative_error(from_loader @ V, from_list @ V) < EXACT_RTOL


LIBRARY_LOSSES = {
    "mse": cc.losses.MSE,
    "ce": cc.losses.CrossEntropy,
    "bce": cc.losses.BCEWithLogits,
}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("loss", LIBRARY_LOSSES)
@pytest.mark.parametrize("operator_type", [cc.Hessian, cc.GGN, cc.EmpiricalFisher], ids=by_name)
def test_library_losses_equal_the_torch_losses(operator_type, loss, reduction):
    model, torch_loss, params, data = Case("sequence", loss, reduction, "uneven").build()
    with_torch = operator_type(model, torch_loss, params, data)
    with_library = operator_type(model, LIBRARY_LOSSES[loss](reduction=reduction), params, data)
    V = random_matrix(with_torch, 2)
    assert relative_error(with_library @ V, with_torch @ V) < EXACT_RTOL


def test_progressbar_does_not_change_the_result(capsys):
    model, loss_func, params, data = CONTRACT_CASE.build()
    plain = cc.GGN(model, loss_func, params, data)
    with_bar = cc.GGN(model, loss_func, params, data, progressbar=True)
    v = torch.randn(plain.shape[0], dtype=F64)
    capsys.readouterr()
    assert (plain @ v - with_bar @ v).abs().max() <= DETERMINISM_ATOL
    assert capsys.readouterr().err  # the bar was drawn (tqdm writes to stderr)


@pytest.mark.parametrize("operator_type", [cc.Hessian, cc.GGN, cc.EmpiricalFisher], ids=by_name)
def test_num_data_sets_the_mean_scaling_only(operator_type):
    """``num_data`` replaces the count ``N = 15`` in "mean" and does nothing for "sum"."""
    for reduction, factor in [("mean", 0.5), ("sum", 1.0)]:
        model, loss_func, params, data = Case("mlp", "mse", reduction, "uneven").build()
        counted = operator_type(model, loss_func, params, data)
        doubled = operator_type(model, loss_func, params, data, num_data=30)
        v = torch.randn(counted.shape[0], dtype=F64)
        assert relative_error(doubled @ v, factor * (counted @ v)) < EXACT_RTOL, reduction
