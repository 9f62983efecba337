"""KFAC factors to and from curvlinops 3 and laplace-torch 0.3 (``cc.interop``).

The references are the peers' own computations on the same model and data: curvlinops'
``KFACLinearOperator`` (its dense matrix ``op @ I``) and the factors laplace-torch's
``KronLaplace(backend=CurvlinopsGGN).fit`` stores; the round trips compare dense float64
matrices. curvlinops' Monte-Carlo labels come from its own generator, so ``fisher_type="mc"``
cannot agree sample by sample and is not compared.
"""

import math

import cola
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cola_curvature as cc
from tests._tols import EXACT_ATOL, EXACT_RTOL

curvlinops = pytest.importorskip("curvlinops", reason="curvlinops is not installed")
laplace = pytest.importorskip("laplace", reason="laplace-torch is not installed")

F64 = torch.float64
NUM_DATA = 6
#: Round trips only copy and rescale factors: they must agree to rounding.
ROUND_TRIP_ATOL = 1e-12
PRIOR_PRECISION = 0.7
SIGMA_NOISE = 0.8
ARCHITECTURES = ["mlp", "cnn"]
LOSSES = ["mse", "ce"]


def build(architecture: str, loss: str, reduction: str = "mean") -> tuple:
    """Return ``(model, loss_func, params, loader)``: float64, biases, 6 examples in 4 + 2."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if architecture == "mlp":
            model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
            inputs = torch.randn(NUM_DATA, 3, dtype=F64)
        else:
            model = nn.Sequential(
                nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 2, 2)
            )
            inputs = torch.randn(NUM_DATA, 2, 3, 3, dtype=F64)
        model = model.to(F64)
        if loss == "mse":
            loss_func = nn.MSELoss(reduction=reduction)
            targets = torch.randn(NUM_DATA, 2, dtype=F64)
        else:
            loss_func = nn.CrossEntropyLoss(reduction=reduction)
            targets = torch.randint(0, 2, (NUM_DATA,))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4)
    return model, loss_func, list(model.parameters()), loader


@pytest.fixture(scope="module")
def problems() -> dict:
    """Every ``(architecture, loss)`` problem, built once."""
    return {(a, loss): build(a, loss) for a in ARCHITECTURES for loss in LOSSES}


def dense(operator: object, size: int) -> torch.Tensor:
    """Return a curvlinops operator (or ours) as a dense matrix, one product with ``I``."""
    return operator @ torch.eye(size, dtype=F64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = EXACT_ATOL):
    """Assert a relative Frobenius error below ``EXACT_RTOL`` (plus ``atol``)."""
    error = torch.linalg.norm(actual - expected)
    assert error <= EXACT_RTOL * torch.linalg.norm(expected) + atol, error


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("separate", [True, False])
def test_curvlinops_operator_from_our_factors_is_curvlinops_kfac(
    problems, architecture, loss, fisher_type, separate
):
    """The exported operator, and our KFAC itself, equal curvlinops' own KFAC."""
    model, loss_func, params, loader = problems[architecture, loss]
    kfac = cc.KFAC(
        model,
        loss_func,
        params,
        loader,
        fisher_type=fisher_type,
        separate_weight_and_bias=separate,
    )
    exported = cc.interop.to_curvlinops(kfac, model, loss_func, params, loader)
    with torch.random.fork_rng():
        reference = curvlinops.KFACLinearOperator(
            model,
            loss_func,
            params,
            loader,
            fisher_type=fisher_type,
            separate_weight_and_bias=separate,
            check_deterministic=False,
        )
        expected = dense(reference, kfac.shape[0])
    assert_close(dense(exported, kfac.shape[0]), expected)
    assert_close(kfac.to_dense(), expected)


def test_curvlinops_reduce_on_a_cnn_matches(problems):
    """KFAC-reduce (averaged patches) travels too."""
    model, loss_func, params, loader = problems["cnn", "ce"]
    kfac = cc.KFAC(model, loss_func, params, loader, kfac_approx="reduce")
    exported = cc.interop.to_curvlinops(kfac, model, loss_func, params, loader)
    reference = curvlinops.KFACLinearOperator(
        model,
        loss_func,
        params,
        loader,
        fisher_type="type-2",
        kfac_approx="reduce",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    assert_close(dense(exported, kfac.shape[0]), dense(reference, kfac.shape[0]))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("separate", [True, False])
def test_curvlinops_round_trip(problems, architecture, separate):
    """ours → curvlinops → ours is the same matrix, and takes parameter-shaped input."""
    model, loss_func, params, loader = problems[architecture, "ce"]
    kfac = cc.KFAC(model, loss_func, params, loader, separate_weight_and_bias=separate)
    exported = cc.interop.to_curvlinops(kfac, model, loss_func, params, loader)
    back = cc.interop.from_curvlinops(exported)
    assert (back.to_dense() - kfac.to_dense()).abs().max() <= ROUND_TRIP_ATOL
    vector = [torch.ones_like(p) for p in params]
    for ours, theirs in zip(back @ vector, kfac @ vector, strict=True):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= ROUND_TRIP_ATOL


@pytest.mark.parametrize("separate", [True, False])
def test_from_curvlinops_computes_and_copies_its_factors(problems, separate):
    """A fresh curvlinops operator (no factors yet) becomes our operator of its matrix."""
    model, loss_func, params, loader = problems["cnn", "mse"]
    operator = curvlinops.KFACLinearOperator(
        model,
        loss_func,
        params,
        loader,
        fisher_type="type-2",
        separate_weight_and_bias=separate,
        check_deterministic=False,
    )
    ours = cc.interop.from_curvlinops(operator)
    matrix = dense(operator, ours.shape[0])
    assert_close(ours.to_dense(), matrix)
    damped = ours + PRIOR_PRECISION * cola.ops.I_like(ours)
    expected = torch.logdet(matrix + PRIOR_PRECISION * torch.eye(ours.shape[0], dtype=F64))
    assert math.isclose(cola.linalg.logdet(damped), expected, rel_tol=EXACT_RTOL)


def laplace_fit(model: nn.Module, loss: str, loader: DataLoader) -> object:
    """Return laplace-torch's own ``KronLaplace`` fitted with its curvlinops backend."""
    likelihood = "regression" if loss == "mse" else "classification"
    noise = SIGMA_NOISE if loss == "mse" else 1.0
    fitted = laplace.KronLaplace(
        model,
        likelihood,
        sigma_noise=noise,
        prior_precision=PRIOR_PRECISION,
        backend=laplace.curvature.CurvlinopsGGN,
    )
    fitted.fit(loader)
    return fitted


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("loss", LOSSES)
def test_laplace_kron_is_laplace_torch_fit(problems, architecture, loss):
    """Exported factors equal those laplace-torch fits, and give our posterior and log det."""
    model, loss_func, params, loader = problems[architecture, loss]
    kfac = cc.KFAC(model, loss_func, params, loader, separate_weight_and_bias=True)
    kron = cc.interop.to_laplace_kron(kfac)
    fitted = laplace_fit(model, loss, loader)
    assert [len(group) for group in kron.kfacs] == [len(group) for group in fitted.H_facs.kfacs]
    for ours, theirs in zip(kron.kfacs, fitted.H_facs.kfacs, strict=True):
        for factor, reference in zip(ours, theirs, strict=True):
            assert_close(factor, reference)
    fitted.H_facs, fitted.H = kron, kron.decompose()
    nll_scale = 0.5 if loss == "mse" else 1.0
    outputs = torch.cat([model(x) for x, _ in loader])
    terms = outputs[0].numel() if loss == "mse" else 1
    summed = kfac.to_dense() * NUM_DATA * terms * nll_scale
    noise = SIGMA_NOISE if loss == "mse" else 1.0
    eye = torch.eye(kfac.shape[0], dtype=F64)
    precision = summed / noise**2 + PRIOR_PRECISION * eye
    assert_close(fitted.posterior_precision.to_matrix(), precision)
    expected = torch.linalg.slogdet(precision).logabsdet
    assert math.isclose(fitted.log_det_posterior_precision, expected, rel_tol=EXACT_RTOL)
    ours = cc.Laplace(
        model,
        loss_func,
        params,
        loader,
        prior_precision=PRIOR_PRECISION,
        sigma_noise=noise,
        separate_weight_and_bias=True,
    )
    assert math.isclose(ours.log_det_posterior_precision(), expected, rel_tol=EXACT_RTOL)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_laplace_round_trip(architecture, loss, reduction):
    """ours → laplace-torch → ours is the same matrix, for either reduction."""
    model, loss_func, params, loader = build(architecture, loss, reduction)
    kfac = cc.KFAC(model, loss_func, params, loader, separate_weight_and_bias=True)
    back = cc.interop.from_laplace_kron(
        cc.interop.to_laplace_kron(kfac), model, loss_func, params, loader
    )
    assert (back.to_dense() - kfac.to_dense()).abs().max() <= ROUND_TRIP_ATOL


def test_joint_blocks_do_not_fit_laplace_kron(problems):
    """laplace-torch holds one group per tensor: a joint weight-bias KFAC is refused."""
    model, loss_func, params, loader = problems["mlp", "ce"]
    kfac = cc.KFAC(model, loss_func, params, loader)
    with pytest.raises(ValueError, match="separate_weight_and_bias=True"):
        cc.interop.to_laplace_kron(kfac)


def test_embedding_and_uncovered_blocks_are_refused():
    """Only Linear / Conv2d blocks travel; an embedding or an uncovered block raises."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Embedding(5, 3), nn.LayerNorm(3), nn.Flatten(), nn.Linear(6, 2)
        ).to(F64)
        inputs = torch.randint(0, 5, (NUM_DATA, 2))
        targets = torch.randint(0, 2, (NUM_DATA,))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4)
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    covered = [params[0], params[3], params[4]]
    embedding = cc.KFAC(model, loss_func, covered, loader, separate_weight_and_bias=True)
    with pytest.raises(ValueError, match="'embedding' layer"):
        cc.interop.to_curvlinops(embedding, model, loss_func, covered, loader)
    with pytest.raises(ValueError, match="'embedding' layer"):
        cc.interop.to_laplace_kron(embedding)
    linear = params[3:]
    uncovered = cc.KFAC(model, loss_func, [params[1], *linear], loader, uncovered="diagonal")
    with pytest.raises(ValueError, match="uncovered block"):
        cc.interop.to_laplace_kron(uncovered)


def test_bad_inputs_are_refused(problems):
    """EKFAC, derived operators, another loss or params, and peers' other types raise."""
    model, loss_func, params, loader = problems["mlp", "ce"]
    kfac = cc.KFAC(model, loss_func, params, loader)
    ekfac = cc.EKFAC(model, loss_func, params, loader)
    with pytest.raises(TypeError, match="without Kronecker factors"):
        cc.interop.to_curvlinops(ekfac, model, loss_func, params, loader)
    with pytest.raises(TypeError, match="must be a cola_curvature.KFAC"):
        cc.interop.to_laplace_kron(kfac.scaled(2.0))
    with pytest.raises(TypeError, match="built with CrossEntropy"):
        summed = nn.CrossEntropyLoss(reduction="sum")
        cc.interop.to_curvlinops(kfac, model, summed, params, loader)
    with pytest.raises(ValueError, match="params have sizes"):
        cc.interop.to_curvlinops(kfac, model, loss_func, params[::-1], loader)
    eigen = curvlinops.EKFACLinearOperator(
        model, loss_func, params, loader, check_deterministic=False
    )
    with pytest.raises(TypeError, match="EKFACLinearOperator"):
        cc.interop.from_curvlinops(eigen)
    kron = cc.interop.to_laplace_kron(
        cc.KFAC(model, loss_func, params, loader, separate_weight_and_bias=True)
    )
    with pytest.raises(ValueError, match="one group per parameter tensor"):
        cc.interop.from_laplace_kron(kron, model, loss_func, params[:2], loader)
    binary = cc.KFAC(
        model,
        nn.BCEWithLogitsLoss(),
        params,
        [(x, torch.zeros(len(x), 2, dtype=F64)) for x, _ in loader],
        separate_weight_and_bias=True,
    )
    with pytest.raises(TypeError, match="laplace-torch's likelihoods"):
        cc.interop.to_laplace_kron(binary)
