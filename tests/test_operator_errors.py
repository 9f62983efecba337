"""Bad input gets a clear ``ValueError``/``TypeError`` that names the fix, and changes nothing.

Messages are matched loosely (one or two key words, case-insensitive) so that rewording a
message does not break a test, while a message that says nothing useful does.
"""

import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests._state import assert_unchanged, snapshot
from tests._tols import DETERMINISM_ATOL, EXACT_RTOL
from tests.cases import F64, Case, ignore_some_labels
from tests.reference import dense_empirical_fisher, dense_ggn, dense_hessian

MATRIX_FREE = [cc.Hessian, cc.GGN, cc.EmpiricalFisher, cc.FisherMC]
WITH_KFAC = MATRIX_FREE + [cc.KFAC]


def by_name(operator_type):
    return operator_type.__name__


def mentions_all(*words):
    """A regex matching a message that contains every word, in any order, any case."""
    return "(?is)" + "".join(f"(?=.*(?:{word}))" for word in words)


def problem():
    return Case("mlp", "ce", "mean", "uneven").build()


@pytest.fixture
def built():
    """``(GGN operator, model)`` of the MLP problem."""
    model, loss_func, params, data = problem()
    return cc.GGN(model, loss_func, params, data), model


# D = 43 for the MLP: a message naming what was expected and what was received carries
# both sizes (43 and 44).
BAD_VECTORS = {
    "length": (lambda D: torch.zeros(D + 1, dtype=F64), ValueError, mentions_all("43", "44")),
    "dtype": (
        lambda D: torch.zeros(D, dtype=torch.float32),
        ValueError,
        mentions_all("float64", "float32"),
    ),
    "ndim": (lambda D: torch.zeros(D, 2, 2, dtype=F64), ValueError, r"(?i)\(D, ?k\)|ndim|dim"),
    "param-shapes": (lambda D: [torch.zeros(3, dtype=F64)], ValueError, "(?i)shape"),
    "param-count": (
        lambda D: [torch.zeros(5, 4, dtype=F64)],
        ValueError,
        "(?i)shape|tensors|entries",
    ),
    "numpy": (lambda D: torch.zeros(D, dtype=F64).numpy(), TypeError, "(?i)tensor"),
}


@pytest.mark.parametrize("name", BAD_VECTORS)
def test_bad_vectors(built, name):
    operator, model = built
    make_v, error, match = BAD_VECTORS[name]
    v = torch.linspace(0, 1, operator.shape[0], dtype=F64)
    good = operator @ v
    before = snapshot(model)
    with pytest.raises(error, match=match):
        operator @ make_v(operator.shape[0])
    assert_unchanged(before, model)
    assert (operator @ v - good).abs().max() <= DETERMINISM_ATOL  # the operator still works


@pytest.mark.parametrize("operator_type", WITH_KFAC, ids=by_name)
def test_bad_data(operator_type):
    model, loss_func, params, data = problem()
    X, y = data[0]
    before = snapshot(model)
    with pytest.raises(ValueError, match="(?i)empty"):
        operator_type(model, loss_func, params, [])
    with pytest.raises(TypeError, match="(?i)re-?iterable"):
        operator_type(model, loss_func, params, (batch for batch in data))
    with pytest.raises(TypeError, match="(?i)re-?iterable"):
        operator_type(model, loss_func, params, iter(data))
    with pytest.raises(ValueError, match="(?i)nan"):
        operator_type(model, loss_func, params, [(X * float("nan"), y)])
    with pytest.raises(ValueError, match="(?i)nan|inf"):
        operator_type(model, loss_func, params, [(X * float("inf"), y)])
    with pytest.raises(TypeError, match=r"(?i)\(X, y\)|pair"):
        operator_type(model, loss_func, params, [X])
    assert_unchanged(before, model)


@pytest.mark.parametrize("check_deterministic", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("operator_type", MATRIX_FREE, ids=by_name)
def test_bad_targets(operator_type, check_deterministic):
    """Wrong target shapes fail at construction or, unchecked, at the latest in the product."""
    model, loss_func, params, data = problem()
    X, y = data[0]
    before = snapshot(model)
    bad = {
        "ce-labels-(N,1)": (loss_func, [(X, y[:, None])], mentions_all("label", "shape|\\(")),
        "ce-float-labels": (loss_func, [(X, y.to(F64))], "(?i)integer|label|dtype"),
        "mse-shape": (nn.MSELoss(), [(X, torch.zeros(X.shape[0], 1, dtype=F64))], "(?i)shape"),
        "bce-shape": (
            nn.BCEWithLogitsLoss(),
            [(X, torch.zeros(X.shape[0], dtype=F64))],
            "(?i)shape",
        ),
    }
    for name, (loss, bad_data, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            operator = operator_type(
                model, loss, params, bad_data, check_deterministic=check_deterministic
            )
            operator @ torch.ones(operator.shape[0], dtype=F64)
            pytest.fail(f"{name}: no error")
    assert_unchanged(before, model)


@pytest.mark.parametrize("bad_label", [3, -1], ids=["label-C", "label-minus-1"])
@pytest.mark.parametrize("operator_type", MATRIX_FREE, ids=by_name)
def test_labels_outside_the_classes(operator_type, bad_label):
    """Torch raises for labels outside ``[0, C)``; the operators must not compute silently."""
    model, loss_func, params, data = problem()  # C = 3 classes
    (X, y), *rest = data
    y = y.clone()
    y[0] = bad_label
    before = snapshot(model)
    with pytest.raises(ValueError, match="(?i)label|class|range"):
        operator = operator_type(model, loss_func, params, [(X, y), *rest])
        operator @ torch.ones(operator.shape[0], dtype=F64)
    assert_unchanged(before, model)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("operator_type", [cc.Hessian, cc.GGN, cc.EmpiricalFisher], ids=by_name)
def test_ignored_labels_follow_torch_or_raise(operator_type, reduction):
    """``ignore_index`` labels (-100, e.g. sequence padding) are left out of torch's risk.

    The operator must equal the reference of that risk, or refuse with a ``ValueError``
    that names ``ignore_index``; computing something else silently is the failure.
    """
    model, loss_func, params, data = Case("sequence", "ce", reduction, "uneven").build()
    data = ignore_some_labels(data)
    reference = {
        cc.Hessian: dense_hessian,
        cc.GGN: dense_ggn,
        cc.EmpiricalFisher: dense_empirical_fisher,
    }[operator_type]
    try:
        operator = operator_type(model, loss_func, params, data)
        dense = operator.to_dense()
    except ValueError as error:
        assert "ignore" in str(error).lower(), error
    else:
        expected = reference(model, loss_func, params, data)
        assert ((dense - expected).norm() / expected.norm()).item() < EXACT_RTOL


@pytest.mark.parametrize("operator_type", WITH_KFAC, ids=by_name)
def test_bad_params(operator_type):
    model, loss_func, params, data = problem()
    before = snapshot(model)
    with pytest.raises(ValueError, match="(?i)not a parameter|parameters"):
        operator_type(model, loss_func, [torch.zeros(3, dtype=F64)], data)
    with pytest.raises(ValueError, match="(?i)not a parameter|parameters"):
        operator_type(model, loss_func, [params[0].detach().clone()], data)
    with pytest.raises(ValueError, match="(?i)more than once|duplicate|twice"):
        operator_type(model, loss_func, [params[0], params[1], params[0]], data)
    with pytest.raises(TypeError, match="(?i)non-empty|empty"):
        operator_type(model, loss_func, [], data)
    assert_unchanged(before, model)


@pytest.mark.parametrize("operator_type", WITH_KFAC, ids=by_name)
def test_bad_losses_and_models(operator_type):
    model, loss_func, params, data = problem()
    before = snapshot(model)
    with pytest.raises(TypeError, match=mentions_all("MSE", "CrossEntropy", "BCEWithLogits")):
        operator_type(model, nn.L1Loss(), params, data)
    with pytest.raises(ValueError, match=mentions_all("reduction", "none")):
        operator_type(model, nn.CrossEntropyLoss(reduction="none"), params, data)
    with pytest.raises(ValueError, match=mentions_all("reduction", "none")):
        operator_type(model, nn.MSELoss(reduction="none"), params, data)
    with pytest.raises((TypeError, ValueError), match="(?i)nn.Module|backend"):
        operator_type(lambda x: x, loss_func, params, data)
    assert_unchanged(before, model)


@pytest.mark.parametrize("operator_type", WITH_KFAC, ids=by_name)
def test_nondeterminism_names_the_likely_causes(operator_type):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).to(F64)
        X, y = torch.randn(10, 3, dtype=F64), torch.randint(0, 2, (10,))
    params = list(model.parameters())
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=mentions_all("dropout", "batch.?norm", "shuffl")):
        operator_type(model, nn.CrossEntropyLoss(), params, [(X, y)])
    assert_unchanged(before, model)
    shuffled = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=4, shuffle=True
    )
    model.eval()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="(?i)shuffl"):
        operator_type(model, nn.CrossEntropyLoss(), params, shuffled)
    assert_unchanged(before, model)


def test_inputs_that_are_not_tensors_need_batch_size_fn():
    model, loss_func, params, data = Case("mlp", "ce", "mean", "dict").build()
    before = snapshot(model)
    with pytest.raises(TypeError, match="batch_size_fn"):
        cc.GGN(model, loss_func, params, data)
    assert_unchanged(before, model)


def test_bad_options():
    model, loss_func, params, data = problem()
    before = snapshot(model)
    for mc_samples in (0, -1, 1.5):
        with pytest.raises(ValueError, match="mc_samples"):
            cc.FisherMC(model, loss_func, params, data, mc_samples=mc_samples)
    with pytest.raises(ValueError, match=mentions_all("num_data", "15")):
        cc.GGN(model, loss_func, params, data, num_data=3)
    assert_unchanged(before, model)


def test_reused_curvature_data_refuses_options_that_would_change_it():
    model, loss_func, params, data = Case("mlp", "ce", "mean", "uneven").build()
    ggn = cc.GGN(model, loss_func, params, data)
    shared = ggn._data  # what Laplace and KFAC's uncovered block pass on
    same = cc.Hessian(model, loss_func, params, shared, num_data=ggn.num_data)
    assert same.num_data == ggn.num_data
    for options, named in [
        ({"num_data": 10 * ggn.num_data}, "num_data="),
        ({"batch_size_fn": len}, "batch_size_fn"),
        ({"distributed": True}, "distributed=True"),
    ]:
        with pytest.raises(ValueError, match=named):
            cc.Hessian(model, loss_func, params, shared, **options)
