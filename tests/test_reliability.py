"""No silent wrong numbers: bad input gets a clear error from this library, never a crash
from deep inside torch or a surprising result."""

import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests._state import assert_unchanged, snapshot
from tests.cases import F64, Case


@pytest.fixture(scope="module")
def problem():
    return Case("mlp", "ce", "sum", "one").build()


@pytest.fixture(scope="module")
def ggn(problem):
    return cc.GGN(*problem)


def test_empty_column_block_gives_an_empty_product(ggn):
    V = torch.zeros(ggn.shape[0], 0, dtype=F64)
    assert (ggn @ V).shape == (ggn.shape[0], 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("shape", ["vector", "param-shaped"])
def test_non_finite_input_is_refused(ggn, problem, bad, shape):
    v = torch.ones(ggn.shape[0], dtype=F64)
    v[3] = bad
    if shape == "param-shaped":
        params = problem[2]
        v = list(v.split([p.numel() for p in params]))
        v = [c.reshape(p.shape) for c, p in zip(v, params, strict=True)]
    with pytest.raises(ValueError, match="NaN or infinite"):
        ggn @ v


def test_labels_given_as_a_list_are_refused(problem):
    model, loss, params, [(X, y)] = problem
    with pytest.raises(TypeError, match="targets of batch 0 are a list"):
        cc.GGN(model, loss, params, [(X, y.tolist())])


@pytest.mark.parametrize(
    ("size", "error", "words"),
    [(-3, ValueError, "is -3"), (2.5, TypeError, "must return an int"), (4, ValueError, "hold 15")],
    ids=["negative", "float", "wrong-count"],
)
def test_batch_size_fn_is_checked_against_the_targets(problem, size, error, words):
    with pytest.raises(error, match=words):
        cc.GGN(*problem, batch_size_fn=lambda x: size)


class TupleOutput(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x


class DictOutput(TupleOutput):
    def forward(self, x):
        return {"logits": self.net(x)}


@pytest.mark.parametrize("wrapper", [TupleOutput, DictOutput], ids=["tuple", "dict"])
@pytest.mark.parametrize("operator_type", [cc.GGN, cc.Hessian, cc.KFAC], ids=lambda t: t.__name__)
def test_models_returning_several_outputs_are_refused(problem, wrapper, operator_type):
    model, loss, params, data = problem
    with pytest.raises(TypeError, match="one tensor of outputs"):
        operator_type(wrapper(model), loss, params, data)


def test_data_on_the_meta_device_is_refused(problem):
    model, loss, params, [(X, y)] = problem
    with pytest.raises(ValueError, match="meta device"):
        cc.GGN(model, loss, params, [(X.to("meta"), y.to("meta"))])


def test_batch_norm_in_train_mode_is_refused_and_the_model_is_untouched():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(F64)
        X, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    before = snapshot(model)
    for operator_type in (cc.GGN, cc.KFAC, cc.DiagonalCurvature):
        with pytest.raises(ValueError, match=r"model\.eval\(\)"):
            operator_type(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
    assert_unchanged(before, model)
    model.eval()
    cc.GGN(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])


@pytest.mark.parametrize("num_samples", [-1, 2.5, True], ids=["negative", "float", "bool"])
def test_laplace_sample_count_is_checked(problem, num_samples):
    laplace = cc.Laplace(*problem, curvature="diag")
    with pytest.raises(ValueError, match="non-negative integer"):
        laplace.sample(num_samples)


@pytest.mark.parametrize("damping", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_damping_is_refused(ggn, problem, damping):
    import cola

    with pytest.raises(ValueError, match="finite"):
        ggn + damping * cola.ops.I_like(ggn)
    kfac = cc.KFAC(*problem)
    with pytest.raises(ValueError, match="damping"):
        kfac + damping * cola.ops.I_like(kfac)
