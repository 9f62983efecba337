"""Bad input gets a clear error that names the fix, and changes nothing."""

import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests.cases import Case

F64 = torch.float64
MATRIX_FREE = [cc.Hessian, cc.GGN, cc.EmpiricalFisher, cc.FisherMC]


def problem():
    return Case("mlp", "ce", "mean", "uneven").build()


@pytest.fixture(scope="module")
def ggn():
    return cc.GGN(*problem())


@pytest.mark.parametrize(
    ("make_v", "error", "match"),
    [
        (lambda D: torch.zeros(D + 1, dtype=F64), ValueError, r"entries but v has shape \(\d+,\)"),
        (lambda D: torch.zeros(D, dtype=torch.float32), ValueError, "dtype torch.float64"),
        (lambda D: torch.zeros(D, 2, 2, dtype=F64), ValueError, r"expected \(D,\) or \(D, k\)"),
        (lambda D: [torch.zeros(3, dtype=F64)], ValueError, "parameter-shaped input must be"),
        (lambda D: torch.zeros(D).numpy(), TypeError, "torch.Tensor"),
    ],
    ids=["length", "dtype", "ndim", "param-shapes", "numpy"],
)
def test_bad_vectors(ggn, make_v, error, match):
    with pytest.raises(error, match=match):
        ggn @ make_v(ggn.shape[0])


@pytest.mark.parametrize("operator_type", MATRIX_FREE + [cc.KFAC], ids=lambda t: t.__name__)
def test_bad_data(operator_type):
    model, loss_func, params, data = problem()
    X, y = data[0]
    with pytest.raises(ValueError, match="data is empty"):
        operator_type(model, loss_func, params, [])
    with pytest.raises(TypeError, match="re-iterable"):
        operator_type(model, loss_func, params, (batch for batch in data))
    with pytest.raises(ValueError, match="NaN"):
        operator_type(model, loss_func, params, [(X * float("nan"), y)])
    with pytest.raises(TypeError, match=r"pair \(X, y\)"):
        operator_type(model, loss_func, params, [X])
    with pytest.raises(ValueError, match="labels"):
        operator_type(model, loss_func, params, [(X, y[:, None])])
    with pytest.raises(ValueError, match="same shape"):
        operator_type(model, nn.MSELoss(), params, [(X, y.to(F64))])


@pytest.mark.parametrize("operator_type", MATRIX_FREE + [cc.KFAC], ids=lambda t: t.__name__)
def test_bad_params_and_losses(operator_type):
    model, loss_func, params, data = problem()
    with pytest.raises(ValueError, match="not a parameter of the model"):
        operator_type(model, loss_func, [torch.zeros(3, dtype=F64)], data)
    with pytest.raises(ValueError, match="more than once"):
        operator_type(model, loss_func, [params[0], params[0]], data)
    with pytest.raises(TypeError, match="non-empty list"):
        operator_type(model, loss_func, [], data)
    with pytest.raises(TypeError, match="Unsupported loss L1Loss.*CrossEntropyLoss"):
        operator_type(model, nn.L1Loss(), params, data)
    with pytest.raises(ValueError, match="reduction 'none'"):
        operator_type(model, nn.CrossEntropyLoss(reduction="none"), params, data)
    with pytest.raises(TypeError, match="No curvature backend"):
        operator_type(lambda x: x, loss_func, params, data)


@pytest.mark.parametrize("operator_type", MATRIX_FREE + [cc.KFAC], ids=lambda t: t.__name__)
def test_nondeterminism_names_the_likely_causes(operator_type):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).to(F64)
    X, y = torch.randn(10, 3, dtype=F64), torch.randint(0, 2, (10,))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    state = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="(?i)dropout.*batch norm.*shuffl"):
        operator_type(model, nn.CrossEntropyLoss(), params, [(X, y)])
    assert all(torch.equal(b, p) for b, p in zip(before, params, strict=True))
    assert torch.equal(state, torch.random.get_rng_state())
    shuffled = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=4, shuffle=True
    )
    with pytest.raises(RuntimeError, match="different batches.*shuffl"):
        operator_type(model.eval(), nn.CrossEntropyLoss(), params, shuffled)
    assert torch.equal(state, torch.random.get_rng_state())


def test_bad_options():
    model, loss_func, params, data = problem()
    with pytest.raises(ValueError, match="mc_samples"):
        cc.FisherMC(model, loss_func, params, data, mc_samples=0)
    with pytest.raises(ValueError, match="num_data=3 but data holds 15"):
        cc.GGN(model, loss_func, params, data, num_data=3)
