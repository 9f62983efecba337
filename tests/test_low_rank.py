"""``diag(d) + U M Uᵀ`` and its rules against dense NumPy, and the low-rank Laplace posterior."""

import cola
import numpy as np
import pytest
import torch

import cola_curvature as cc
from tests.test_laplace import classification_problem, dense_evidence, regression_problem

F64 = torch.float64


def random_operator(D=12, k=3, seed=0, psd=True):
    generator = torch.Generator().manual_seed(seed)
    d = torch.rand(D, dtype=F64, generator=generator) + 0.5
    U = torch.randn(D, k, dtype=F64, generator=generator)
    B = torch.randn(k, k, dtype=F64, generator=generator)
    M = B @ B.T if psd else B + B.T
    operator = cc.DiagonalPlusLowRank(d, U, M, {cola.PSD} if psd else set())
    return operator, (torch.diag(d) + U @ M @ U.T).numpy()


@pytest.mark.parametrize("psd", [True, False], ids=["psd", "indefinite"])
def test_rules_match_numpy(psd):
    operator, dense = random_operator(psd=psd)
    damped = 0.3 * cola.ops.I_like(operator) + operator * 2.0
    expected = 2.0 * dense + 0.3 * np.eye(12)
    assert isinstance(damped, cc.DiagonalPlusLowRank)
    assert np.abs(damped.to_dense().numpy() - expected).max() < 1e-12
    inverse = cola.linalg.inv(damped)
    assert isinstance(inverse, cc.DiagonalPlusLowRank)
    assert np.abs(inverse.to_dense().numpy() - np.linalg.inv(expected)).max() < 1e-10
    sign, log_abs = cola.linalg.slogdet(damped)
    expected_sign, expected_log = np.linalg.slogdet(expected)
    assert sign == expected_sign and abs(log_abs - expected_log) < 1e-10
    assert abs(cola.linalg.trace(damped) - np.trace(expected)) < 1e-10
    assert np.abs(cola.linalg.diag(damped).numpy() - np.diag(expected)).max() < 1e-12
    values, _ = cola.linalg.eig(damped, 2, "LA")
    assert np.abs(values.numpy() - np.linalg.eigvalsh(expected)[::-1][:2]).max() < 1e-8


def test_inverse_factor_squares_to_the_inverse():
    operator, dense = random_operator(seed=1)
    L = operator.inverse_factor().to_dense().numpy()
    assert np.abs(L @ L.T - np.linalg.inv(dense)).max() < 1e-12


@pytest.mark.parametrize(
    "problem", [regression_problem, classification_problem], ids=["regression", "classification"]
)
def test_low_rank_laplace_matches_dense_formulas(problem):
    model, loss_func, params, data = problem()
    regression = isinstance(loss_func, torch.nn.MSELoss)
    sigma = 0.4 if regression else 1.0
    laplace = cc.Laplace(
        model,
        loss_func,
        params,
        data,
        curvature="lowrank",
        rank=5,
        prior_precision=2.0,
        sigma_noise=sigma,
    )
    full = cc.Laplace(model, loss_func, params, data, curvature="full")
    G = full.curvature.to_dense()
    values, vectors = torch.linalg.eigh(G)
    U, s = vectors[:, -5:], values[-5:]
    rest = (G.diagonal() - (U**2 * s).sum(1)).clamp(min=0)
    H = U @ torch.diag(s) @ U.T + torch.diag(rest)
    assert (laplace.curvature.to_dense() - H).abs().max() < 1e-8 * G.abs().max()
    expected, posterior = dense_evidence(model, loss_func, params, data, H, 2.0, sigma, regression)
    assert abs(laplace.log_marginal_likelihood() - expected) < 1e-8 * abs(expected)
    samples = laplace.sample(3, seed=1)
    assert samples.shape == (G.shape[0], 3)
    X = data[0][0][:3]
    _, covariance = laplace.predictive(X)
    assert torch.isfinite(covariance).all()
    with pytest.raises(ValueError, match="rank"):
        cc.Laplace(model, loss_func, params, data, curvature="lowrank", rank=0)
