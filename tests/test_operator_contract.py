"""The operator contract: shape, dtype, annotations, SciPy, determinism, untouched user state."""

import random

import cola
import numpy as np
import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests._tols import EXACT_RTOL
from tests.cases import Case

F64 = torch.float64
ALL_OPERATORS = [cc.Hessian, cc.GGN, cc.EmpiricalFisher, cc.FisherMC, cc.KFAC, cc.EKFAC]
CONTRACT_CASE = Case("cnn", "ce", "mean", "uneven")


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("operator_type", ALL_OPERATORS, ids=lambda t: t.__name__)
def test_shape_dtype_and_annotation(operator_type):
    model, loss_func, params, data = CONTRACT_CASE.build()
    operator = operator_type(model, loss_func, params, data)
    D = sum(p.numel() for p in params)
    assert operator.shape == (D, D)
    assert operator.dtype == F64
    assert operator.isa(cola.SelfAdjoint)
    assert operator.isa(cola.PSD) == (operator_type is not cc.Hessian)


@pytest.mark.parametrize("operator_type", ALL_OPERATORS, ids=lambda t: t.__name__)
def test_to_scipy_agrees_with_matmul(operator_type):
    model, loss_func, params, data = CONTRACT_CASE.build()
    operator = operator_type(model, loss_func, params, data)
    scipy_operator = operator.to_scipy()
    V = torch.randn(operator.shape[0], 2, dtype=F64)
    expected = (operator @ V).numpy()
    assert scipy_operator.dtype == np.float64
    assert np.allclose(scipy_operator @ V[:, 0].numpy(), expected[:, 0], rtol=1e-12, atol=1e-14)
    assert np.allclose(scipy_operator.matmat(V.numpy()), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("operator_type", [cc.Hessian, cc.GGN, cc.EmpiricalFisher, cc.FisherMC])
def test_products_are_deterministic_and_work_without_grad(operator_type):
    model, loss_func, params, data = CONTRACT_CASE.build()
    operator = operator_type(model, loss_func, params, data)
    V = torch.randn(operator.shape[0], 2, dtype=F64)
    first = operator @ V
    assert torch.equal(first, operator @ V)
    with torch.no_grad():
        assert relative_error(operator @ V, first) < EXACT_RTOL


class BatchNormNet(nn.Module):
    """Linear, batch norm, a frozen parameter, dropout: everything a product could disturb."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.dropout = nn.Dropout(0.0)
        self.head = nn.Linear(4, 2)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        return self.head(self.dropout(self.norm(self.linear(x))))


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "torch_rng": torch.random.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
    }


def assert_same(before, after):
    for key in ("params", "buffers"):
        for name, tensor in before[key].items():
            assert torch.equal(tensor, after[key][name]), f"{key} {name} changed"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])
    assert before["python_rng"] == after["python_rng"]


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train-batchnorm"])
@pytest.mark.parametrize("operator_type", ALL_OPERATORS, ids=lambda t: t.__name__)
def test_user_state_is_untouched(operator_type, train_mode):
    torch.manual_seed(0)
    model = BatchNormNet().to(F64).train(train_mode)
    X, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))
    params = [model.linear.weight, model.linear.bias, model.head.weight]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)
    before = snapshot(model)
    operator = operator_type(model, nn.CrossEntropyLoss(), params, loader)
    operator @ torch.randn(operator.shape[0], dtype=F64, generator=torch.Generator().manual_seed(1))
    assert_same(before, snapshot(model))


def test_progressbar_does_not_change_the_result(capsys):
    model, loss_func, params, data = CONTRACT_CASE.build()
    plain = cc.GGN(model, loss_func, params, data)
    with_bar = cc.GGN(model, loss_func, params, data, progressbar=True)
    v = torch.randn(plain.shape[0], dtype=F64)
    assert torch.equal(plain @ v, with_bar @ v)
    assert "GGN" in capsys.readouterr().err


def test_num_data_overrides_the_count_for_mean_scaling():
    model, loss_func, params, data = Case("mlp", "mse", "mean", "one").build()
    counted = cc.GGN(model, loss_func, params, data)
    doubled = cc.GGN(model, loss_func, params, data, num_data=2 * counted.num_data)
    v = torch.randn(counted.shape[0], dtype=F64)
    assert relative_error(doubled @ v, 0.5 * (counted @ v)) < EXACT_RTOL


def test_dict_inputs_with_batch_size_fn():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, batch):
            return self.linear(batch["x"])

    torch.manual_seed(0)
    model = DictModel().to(F64)
    X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    params = list(model.parameters())
    dict_data = [({"x": X[:2]}, y[:2]), ({"x": X[2:]}, y[2:])]
    with pytest.raises(TypeError, match="batch_size_fn"):
        cc.GGN(model, nn.CrossEntropyLoss(), params, dict_data)
    operator = cc.GGN(
        model, nn.CrossEntropyLoss(), params, dict_data, batch_size_fn=lambda b: b["x"].shape[0]
    )
    plain = cc.GGN(model.linear, nn.CrossEntropyLoss(), params, [(X, y)])
    assert relative_error(operator.to_dense(), plain.to_dense()) < EXACT_RTOL
