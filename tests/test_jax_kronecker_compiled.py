"""JAX products of Kronecker-factored operators run as one compiled program: same numbers."""

import cola
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.kronecker_blocks import DiagonalBlock, KroneckerBlock
from tests._tols import EXACT_RTOL

pytestmark = pytest.mark.usefixtures("jax_float64")


def spd(rng, n):
    B = rng.standard_normal((n, n))
    return B @ B.T / n + 0.1 * np.eye(n)


def operator_and_reference():
    """Return a permuted ``G₁⊗A₁ ⊕ G₂⊗diag(a) ⊕ diag(d)`` and its dense matrix (NumPy)."""
    rng = np.random.default_rng(0)
    G1, A1, G2 = spd(rng, 3), spd(rng, 4), spd(rng, 2)
    a, d = rng.uniform(0.5, 2.0, 5), rng.uniform(0.5, 2.0, 6)
    blocks = [
        KroneckerBlock(jnp.asarray(G1), jnp.asarray(A1)),
        KroneckerBlock(jnp.asarray(G2), jnp.asarray(a)),
        DiagonalBlock(jnp.asarray(d)),
    ]
    size = 12 + 10 + 6
    permutation = rng.permutation(size)
    block_dense = scipy.linalg.block_diag(np.kron(G1, A1), np.kron(G2, np.diag(a)), np.diag(d))
    reference = np.empty_like(block_dense)
    reference[np.ix_(permutation, permutation)] = block_dense
    return KroneckerFactored(blocks, jnp.asarray(permutation)), reference


def test_compiled_products_match_the_dense_reference_eagerly_and_under_jit():
    K, reference = operator_and_reference()
    X = jnp.asarray(np.random.default_rng(1).standard_normal((K.shape[0], 3)))
    expected = reference @ np.asarray(X)
    for _ in range(2):  # the second product reuses the compiled program
        np.testing.assert_allclose(np.asarray(K @ X), expected, rtol=EXACT_RTOL, atol=0)
    traced = jax.jit(lambda x: K @ x)(X)
    np.testing.assert_allclose(np.asarray(traced), expected, rtol=EXACT_RTOL, atol=0)


def test_compiled_exactly_damped_inverse_matches_the_dense_reference():
    K, reference = operator_and_reference()
    inverse = cola.linalg.inv(K.damped(1e-2))
    X = jnp.asarray(np.random.default_rng(2).standard_normal((K.shape[0], 2)))
    expected = np.linalg.solve(reference + 1e-2 * np.eye(K.shape[0]), np.asarray(X))
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(inverse @ X), expected, rtol=EXACT_RTOL, atol=0)
