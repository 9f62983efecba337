"""The rules Laplace goes through: isqrt of a diagonal plus low rank, the kept quadrature rule.

``cola.linalg.isqrt`` of ``c I + U M Uᵀ`` is exact (a diagonal plus a rank-``k`` term),
against ``inv(sqrtm)`` in float64 in torch and JAX; ``cola.linalg.logdet(c G + δ I)``
re-weights one quadrature rule of ``G`` kept on ``G``: a second ``(c, δ)`` costs no product.
"""

import cola
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import cola_curvature as cc
from cola_curvature.matfree._random import rademacher
from dispatch_rules.sqrt import inverse_factor
from tests.cases import Case
from tests.jax_cases import build_jax_problem
from tests.test_laplace import classification_problem

pytestmark = pytest.mark.usefixtures("jax_float64")

F64 = torch.float64
D, K = 12, 3
TO_ARRAY = {"torch": torch.as_tensor, "jax": jnp.asarray}


def diagonal_plus_low_rank(backend, diagonal):
    """Return ``diag(d) + U M Uᵀ`` (PSD ``M``) in ``backend`` and its dense NumPy matrix."""
    rng = np.random.default_rng(0)
    U = rng.normal(size=(D, K))
    B = rng.normal(size=(K, K))
    M = B @ B.T
    to = TO_ARRAY[backend]
    operator = cc.DiagonalPlusLowRank(to(diagonal), to(U), to(M), {cola.PSD})
    return operator, np.diag(diagonal) + U @ M @ U.T


def dense(operator):
    return np.asarray(operator.to_dense())


def inverse_sqrtm(matrix):
    return np.linalg.inv(scipy.linalg.sqrtm(matrix).real)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_isqrt_of_a_constant_diagonal_plus_low_rank_is_exact_and_structured(backend):
    operator, matrix = diagonal_plus_low_rank(backend, np.full(D, 0.7))
    expected = inverse_sqrtm(matrix)
    root = cola.linalg.isqrt(operator)
    assert isinstance(root, cc.DiagonalPlusLowRank)
    assert np.abs(dense(root) - expected).max() < 1e-10 * np.abs(expected).max()
    square_root = cola.linalg.sqrt(operator)
    assert isinstance(square_root, cc.DiagonalPlusLowRank)
    assert (
        np.abs(dense(square_root) @ dense(square_root) - matrix).max()
        < 1e-10 * np.abs(matrix).max()
    )
    # the sampling factor is then that same symmetric root
    assert np.abs(dense(inverse_factor(operator)) - expected).max() < 1e-10 * np.abs(expected).max()


def test_isqrt_of_a_varying_diagonal_is_lanczos_and_the_sampling_factor_exact():
    operator, matrix = diagonal_plus_low_rank("torch", np.linspace(0.5, 2.0, D))
    expected = inverse_sqrtm(matrix)
    root = cola.linalg.isqrt(operator)
    assert not isinstance(root, cc.DiagonalPlusLowRank)
    assert np.abs(dense(root) - expected).max() < 1e-8 * np.abs(expected).max()
    # L Lᵀ = A⁻¹ exactly, but L is not A^{-1/2}: the diagonal is not constant
    factor = dense(inverse_factor(operator))
    inverse = np.linalg.inv(matrix)
    assert np.abs(factor @ factor.T - inverse).max() < 1e-12 * np.abs(inverse).max()
    assert np.abs(factor - expected).max() > 1e-3 * np.abs(expected).max()


def test_map_spectrum_refuses_a_varying_diagonal():
    operator, _ = diagonal_plus_low_rank("torch", np.linspace(0.5, 2.0, D))
    with pytest.raises(ValueError, match="constant diagonal"):
        operator.map_spectrum(torch.sqrt)


@pytest.fixture(scope="module")
def ggn():
    model, _, params, data = classification_problem()
    G = cc.GGN(model, nn.CrossEntropyLoss(reduction="sum"), params, data)
    return G, G.to_dense()


@pytest.fixture
def products(monkeypatch):
    """The column counts of every product with a GGN from here on."""
    counted = []
    original = cc.GGN._matmat

    def counting(self, X):
        counted.append(X.shape[1])
        return original(self, X)

    monkeypatch.setattr(cc.GGN, "_matmat", counting)
    return counted


def test_the_exact_rule_is_kept_on_the_ggn_and_reweighted(ggn, products):
    G, matrix = ggn
    identity = torch.eye(matrix.shape[0], dtype=F64)
    first = cola.linalg.logdet(cc.ShiftedCurvature(G, 0.5, 2.0), cola.linalg.Eigh())
    assert sum(products) == matrix.shape[0]
    products.clear()
    for scale, shift in [(3.0, 0.1), (0.25, 2.0)]:
        value = cola.linalg.logdet(cc.ShiftedCurvature(G, shift, scale), cola.linalg.Eigh())
        expected = torch.logdet(scale * matrix + shift * identity)
        assert abs(value - expected) < 1e-10 * abs(expected)
    assert products == []
    assert abs(first - torch.logdet(2.0 * matrix + 0.5 * identity)) < 1e-10 * abs(first)


def test_a_stochastic_rule_is_kept_and_equals_slq_on_the_shifted_operator(ggn, products):
    G, matrix = ggn
    size = matrix.shape[0]
    slq = cc.SLQ(num_probes=4, num_steps=10, seed=3)
    cola.linalg.logdet(cc.ShiftedCurvature(G, 0.5, 2.0), slq)
    assert products
    products.clear()
    P = cc.ShiftedCurvature(G, 0.1, 3.0)
    reweighted = cola.linalg.logdet(P, slq)
    assert products == []
    # Krylov spaces do not change under c A + δ I: Lanczos on P itself gives the same rule
    _, direct = slq.slogdet(P)
    assert abs(reweighted - direct) < 1e-10 * abs(direct)
    # D steps: each probe's rule is exact, the estimate is Hutchinson's of tr log P
    exact_steps = cc.SLQ(num_probes=4, num_steps=size, seed=3)
    eigenvalues, U = torch.linalg.eigh(3.0 * matrix + 0.1 * torch.eye(size, dtype=F64))
    Z = rademacher(P, 4, 3)
    expected = torch.einsum("ij,ik,kj->", Z, (U * eigenvalues.log()) @ U.T, Z) / 4
    assert abs(cola.linalg.logdet(P, exact_steps) - expected) < 1e-9 * abs(expected)


def test_laplace_evidence_and_its_gradient_cost_no_product_after_the_first(products):
    model, loss_func, params, data = classification_problem()
    laplace = cc.Laplace(model, loss_func, params, data, curvature="ggn", prior_precision=1.5)
    full = cc.Laplace(model, loss_func, params, data, curvature="full", prior_precision=1.5)
    laplace.log_marginal_likelihood()
    products.clear()
    delta = torch.tensor(0.3, dtype=F64, requires_grad=True)
    evidence = laplace.log_marginal_likelihood(prior_precision=delta)
    evidence.backward()
    assert laplace.log_det_standard_error(prior_precision=0.7) == 0
    assert products == []
    expected = full.log_marginal_likelihood(prior_precision=0.3)
    assert abs(evidence - expected) < 1e-10 * abs(expected)
    # ∂ logdet P / ∂δ = tr P⁻¹
    P = full.posterior_precision(prior_precision=0.3).to_dense()
    theta = torch.cat([p.detach().flatten() for p in params])
    expected_grad = (
        -0.5 * (theta**2).sum() + 0.5 * len(theta) / 0.3 - 0.5 * torch.trace(torch.linalg.inv(P))
    )
    assert abs(delta.grad - expected_grad) < 1e-9 * abs(expected_grad)


def test_jax_laplace_evidence_gradient_reuses_the_kept_rule(products):
    problem = build_jax_problem(Case("mlp", "mse", "sum", "uneven"))
    laplace = cc.Laplace(*problem.args, curvature="ggn", prior_precision=2.0, sigma_noise=0.5)
    size = laplace.curvature.shape[0]
    P = np.asarray(laplace.posterior_precision(prior_precision=0.8) @ jnp.eye(size))
    laplace.log_det_posterior_precision()
    products.clear()
    gradient = jax.grad(lambda delta: laplace.log_det_posterior_precision(delta))(0.8)
    assert products == []
    expected = np.trace(np.linalg.inv(P))
    assert abs(float(gradient) - expected) < 1e-10 * abs(expected)
    log_det = np.linalg.slogdet(P)[1]
    assert abs(float(laplace.log_det_posterior_precision(0.8)) - log_det) < 1e-10 * abs(log_det)
