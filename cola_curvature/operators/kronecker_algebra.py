"""Rule-free algebra on Kronecker factors: products, diagonals, shifts and eigendecompositions.

A factor is a dense symmetric matrix or, as a 1-d array, a diagonal one; an eigenbasis given
as ``None`` is the identity. :func:`symmetric_eigh` decomposes in float64 with a host fallback.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
from cola.ops import Dense, Diagonal, LinearOperator

from cola_curvature._tracing import finite_or_traced
from cola_curvature.types import Array


def _factor_operator(factor: Array) -> LinearOperator:
    """Return a factor as a CoLA operator: ``Diagonal`` for a 1-d array, else ``Dense``."""
    return Diagonal(factor) if factor.ndim == 1 else Dense(factor)


def _factor_diagonal(factor: Array) -> Array:
    """Return the diagonal of a factor (itself when the factor is stored as its diagonal)."""
    return factor if factor.ndim == 1 else Dense(factor).xnp.diag(factor)


def _factor_eigh(factor: Array) -> tuple[Array, Array | None]:
    """Return ``(λ, Q)`` of a factor; a diagonal ``d`` is its own: ``(d, None)`` (``Q = I``)."""
    return (factor, None) if factor.ndim == 1 else symmetric_eigh(factor)


def _from_eigh(values: Array, basis: Array | None) -> Array:
    """Return ``Q diag(λ) Qᵀ``, or the diagonal ``λ`` itself when ``Q`` is the identity."""
    return values if basis is None else (basis * values) @ basis.T


def _shifted_factor(factor: Array, shift: Array) -> Array:
    """Return ``F + c I`` in the factor's own storage (dense or diagonal)."""
    if factor.ndim == 1:
        return factor + shift
    xnp = Dense(factor).xnp
    eye = xnp.eye(
        factor.shape[0], factor.shape[0], dtype=factor.dtype, device=xnp.get_device(factor)
    )
    return factor + shift * eye


def _left(factor: Array | None, X: Array) -> Array:
    """Return ``F X`` for a dense or diagonal (1-d) ``F``; ``X`` for ``None`` (the identity)."""
    if factor is None:
        return X
    return factor[:, None] * X if factor.ndim == 1 else factor @ X


def _right(X: Array, factor: Array | None) -> Array:
    """Return ``X F`` for a dense or diagonal (1-d) ``F``; ``X`` for ``None`` (the identity)."""
    if factor is None:
        return X
    return X * factor if factor.ndim == 1 else X @ factor


def _transposed(basis: Array | None) -> Array | None:
    """Return ``Qᵀ`` (``None``, the identity, stays ``None``)."""
    return None if basis is None else basis.T


def symmetric_eigh(matrix: Array) -> tuple[Array, Array]:
    """Return ``(λ, Q)`` of a symmetric matrix, computed in float64 and cast back.

    JAX without ``jax_enable_x64`` has no float64: there the decomposition runs in float32
    (JAX truncates the cast; its warning about that is silenced here). When the backend's
    solver fails (LAPACK's divide and conquer can fail to converge on matrices with large
    clusters of tiny eigenvalues, e.g. a rank-2 factor of size 576; torch raises, JAX
    returns NaN), the decomposition is redone on the host by :func:`_host_eigh`.
    """
    xnp = Dense(matrix).xnp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
        wide = xnp.cast(matrix, xnp.float64)
    try:
        values, vectors = xnp.eigh(wide)
    except RuntimeError:  # torch.linalg.LinAlgError: the solver did not converge
        values = vectors = None
    if values is None or not finite_or_traced(values.sum()):
        values, vectors = _host_eigh(wide)
    return xnp.cast(values, matrix.dtype), xnp.cast(vectors, matrix.dtype)


def _host_eigh(matrix: Array) -> tuple[Array, Array]:
    """Return ``(λ, Q)`` by SciPy on the host: LAPACK's ``syevr``, else the QR algorithm ``syev``.

    Raises:
        ValueError: when the matrix has non-finite entries, or neither driver converges.
    """
    xnp = Dense(matrix).xnp
    host = np.asarray(xnp.to_np(matrix), dtype=np.float64)
    if not np.isfinite(host).all():
        raise ValueError("a Kronecker factor has non-finite entries; it has no eigenbasis.")
    for driver in ("evr", "ev"):
        try:
            values, vectors = scipy.linalg.eigh(host, driver=driver)
        except np.linalg.LinAlgError:
            continue
        device = xnp.get_device(matrix)
        return (
            xnp.array(values, dtype=matrix.dtype, device=device),
            xnp.array(vectors, dtype=matrix.dtype, device=device),
        )
    raise ValueError("no symmetric eigensolver converged on a Kronecker factor.")
