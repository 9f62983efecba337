"""No silent wrong numbers: bad input gets a clear error from this library, never a crash
from deep inside torch or a surprising result."""

import re

import cola
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
    with pytest.raises(ValueError, match="finite"):
        ggn + damping * cola.ops.I_like(ggn)
    kfac = cc.KFAC(*problem)
    with pytest.raises(ValueError, match="damping"):
        kfac + damping * cola.ops.I_like(kfac)


def test_a_rank_deficient_kfac_has_no_finite_log_determinant(problem):
    # one example: every factor has rank one, the eigenvalues are zero up to ±1e-17
    model, loss, params, [(X, y)] = problem
    kfac = cc.KFAC(model, loss, params, [(X[:1], y[:1])])
    dense_eigenvalues = torch.linalg.eigvalsh(kfac.to_dense())
    assert dense_eigenvalues.abs().min() < 1e-12 * dense_eigenvalues.abs().max()
    sign, log_abs = cola.linalg.slogdet(kfac)
    assert sign == 0 and log_abs == -float("inf")
    assert cola.linalg.logdet(kfac) == -float("inf")
    with pytest.raises(ValueError, match="singular"):
        cola.linalg.inv(kfac)
    damped = kfac + 0.1 * cola.ops.I_like(kfac)
    expected_sign, expected = torch.linalg.slogdet(damped.to_dense())
    sign, log_abs = cola.linalg.slogdet(damped)
    assert sign == expected_sign == 1 and abs(log_abs - expected) < 1e-10 * abs(expected)


def test_an_uncertain_determinant_sign_says_what_logdet_returns(problem):
    hessian = cc.Hessian(*problem)
    damped = hessian + 0.3 * cola.ops.I_like(hessian)
    with pytest.warns(cc.ConvergenceWarning, match=re.escape("logdet returns that log|det A|")):
        sign, log_abs = cola.linalg.slogdet(damped, log_alg=cc.SLQ(num_probes=3, num_steps=5))
    assert torch.isnan(sign) and torch.isfinite(log_abs)


@pytest.mark.parametrize("options", [{"num_runs": 0}, {"num_steps": 0}, {"num_runs": 1.5}])
@pytest.mark.parametrize("density", ["spectral_density", "log_spectral_density"])
def test_spectral_density_budgets_are_checked(ggn, options, density):
    with pytest.raises(ValueError, match="positive integer"):
        getattr(cc.estimators, density)(ggn, **options)


@pytest.mark.parametrize("operator_type", [cc.GGN, cc.Hessian, cc.EmpiricalFisher])
def test_products_from_several_threads_match_the_serial_ones(operator_type):
    from concurrent.futures import ThreadPoolExecutor

    model, loss, params, data = Case("mlp", "ce", "mean", "uneven").build()
    parameter_objects = [id(p) for p in model.parameters()]
    operator = operator_type(model, loss, params, data)
    other = cc.GGN(model, loss, params, data)
    V = torch.linspace(-1.0, 1.0, operator.shape[0] * 3, dtype=F64).reshape(-1, 3)
    serial = operator @ V, other @ V
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(lambda op=op: op @ V) for _ in range(6) for op in (operator, other)]
        results = [job.result() for job in jobs]
    for index, result in enumerate(results):
        assert torch.equal(result, serial[index % 2])
    assert [id(p) for p in model.parameters()] == parameter_objects
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
