"""Pins the CoLA 0.0.7 behaviour cola_curvature relies on, so an upgrade that changes it fails."""

import importlib.metadata

import cola
import numpy as np
import pytest
import torch
from cola.ops import BlockDiag, Dense, Identity, Kronecker, LinearOperator, Product, ScalarMul, Sum

import cola_curvature  # noqa: F401  (applies the shims under test)

F64 = torch.float64


class Doubler(LinearOperator):
    """A custom operator the way ours are written: ``super().__init__`` plus ``_matmat``."""

    def __init__(self, n):
        super().__init__(F64, (n, n))

    def _matmat(self, X):
        return 2 * X


def dense(seed, n, m=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, m or n, dtype=F64, generator=generator)


def test_pinned_versions():
    assert importlib.metadata.version("cola-ml") == "0.0.7"
    major, minor = (int(p) for p in importlib.metadata.version("beartype").split(".")[:2])
    assert (major, minor) < (0, 23)
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("plum-dispatch")


def test_annotations():
    A = cola.PSD(Doubler(3))
    assert A.isa(cola.PSD)
    assert A.isa(cola.SelfAdjoint)
    assert not Doubler(3).isa(cola.PSD)
    assert issubclass(cola.PSD, cola.SelfAdjoint)
    damped = A + 0.5 * cola.ops.I_like(A)
    assert damped.isa(cola.PSD)


def test_matmul_with_vectors_and_matrices_and_to_dense():
    A = Doubler(4)
    v, V = dense(0, 4, 1)[:, 0], dense(1, 4, 3)
    assert (A @ v).shape == (4,)
    assert torch.equal(A @ v, 2 * v)
    assert torch.equal(A @ V, 2 * V)
    assert torch.equal(A.to_dense(), 2 * torch.eye(4, dtype=F64))
    assert A.shape == (4, 4)
    assert A.dtype == F64


def test_identity_like_and_damped_sum_types():
    A = Doubler(3)
    eye = cola.ops.I_like(A)
    assert isinstance(eye, Identity)
    assert eye.shape == A.shape
    scaled = 0.5 * eye
    assert isinstance(scaled, Product)
    assert [type(M) for M in scaled.Ms] == [ScalarMul, Identity]
    assert isinstance(eye * 0.5, Product)
    assert isinstance(Doubler(3) + Dense(dense(2, 3)), Sum)
    total = Doubler(3) + Dense(dense(2, 3))
    expected = 2 * torch.eye(3, dtype=F64) + dense(2, 3)
    assert torch.allclose(total.to_dense(), expected)


def test_sum_product_blockdiag_kronecker_shapes_and_dense_forms():
    A, B, C = dense(3, 2), dense(4, 3), dense(5, 3, 2)
    assert torch.allclose((Dense(B) @ Dense(C)).to_dense(), B @ C)
    assert isinstance(Dense(B) @ Dense(C), Product)
    block = BlockDiag(Dense(A), Dense(B))
    assert block.shape == (5, 5)
    assert torch.allclose(block.to_dense(), torch.block_diag(A, B))
    kron = Kronecker(Dense(A), Dense(B))
    assert kron.shape == (6, 6)
    assert torch.allclose(kron.to_dense(), torch.kron(A, B))
    v = dense(6, 6, 1)
    assert torch.allclose(kron @ v, torch.kron(A, B) @ v)
    assert torch.allclose((2.0 * Dense(A)).to_dense(), 2 * A)


def test_cg_inverse_returns_an_iterative_operator():
    M = dense(7, 4)
    A = cola.PSD(Dense(M @ M.T + 4 * torch.eye(4, dtype=F64)))
    b = dense(8, 4, 1)[:, 0]
    x = cola.linalg.inv(A, alg=cola.linalg.CG(tol=1e-12)) @ b
    assert torch.allclose(A.to_dense() @ x, b, atol=1e-9)


def test_gmres_on_a_jax_operator_works_after_import():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    M = jnp.asarray(rng.standard_normal((5, 5)) + 5 * np.eye(5))
    b = jnp.asarray(rng.standard_normal(5))
    x = cola.linalg.inv(Dense(M), alg=cola.linalg.GMRES(tol=1e-12, max_iters=50)) @ b
    assert np.allclose(np.asarray(M @ x), np.asarray(b), atol=1e-8)
