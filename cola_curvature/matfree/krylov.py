"""Lanczos with full reorthogonalisation: tridiagonalisations for quadrature, and eigenpairs.

For a symmetric ``A`` and a unit start vector ``q_1``, Lanczos builds an orthonormal basis
``Q_s = [q_1 … q_s]`` of the Krylov space ``span{q_1, A q_1, …, A^{s-1} q_1}`` with
``Q_sᵀ A Q_s = T_s`` tridiagonal (diagonal ``α``, off-diagonal ``β``). Each new vector is
orthogonalised against *all* previous ones (classical Gram-Schmidt, twice), which costs
``O(s D)`` per step but keeps ``Q_s`` orthonormal to working precision, so no spurious
copies of converged eigenvalues appear (CoLA's Lanczos does not reorthogonalise and
returns NaN on breakdown).

Breakdown, ``β_j ≈ 0``, means the Krylov space is invariant. The batched
tridiagonalisation then continues the column with zero vectors (``T`` becomes block
diagonal and the extra block has zero weight in the quadrature); the eigen-solver
restarts from a random vector orthogonal to the basis, so repeated eigenvalues are found
with their multiplicity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from cola.ops import LinearOperator

from cola_curvature.matfree._convergence import report_failure
from cola_curvature.matfree._random import random_source

Array = Any

#: Orders of ``which``: largest / smallest magnitude, largest / smallest algebraic.
ORDERS = ("LM", "SM", "LA", "SA")


def breakdown_threshold(A: LinearOperator) -> float:
    """Return ``β / ‖A q‖`` below which a Lanczos step counts as breakdown (``100 √D ε``)."""
    return 100 * A.shape[0] ** 0.5 * float(A.xnp.finfo(A.dtype).eps)


def orthogonalize(w: Array, basis: list[Array], xnp: Any) -> Array:
    """Return ``w`` minus its projection on the orthonormal ``basis`` (column-wise, twice).

    ``w`` and every basis entry have shape ``(D, p)``: column ``c`` of ``w`` is
    orthogonalised against column ``c`` of each basis entry.
    """
    for _ in range(2):
        for q in basis:
            w = w - q * xnp.sum(q * w, axis=0, keepdims=True)
    return w


def lanczos_tridiagonals(A: LinearOperator, start: Array, num_steps: int) -> tuple[Array, Array]:
    """Run ``num_steps`` Lanczos steps from each column of ``start`` (``(D, p)``), together.

    Returns:
        ``(α, β)`` of shapes ``(s, p)`` and ``(s − 1, p)``: the tridiagonal of each
        column. One product ``A @ Q`` with ``p`` columns per step.

    """
    xnp = A.xnp
    threshold = breakdown_threshold(A)
    q = start / xnp.norm(start, axis=0, keepdims=True)
    basis: list[Array] = []
    alphas: list[Array] = []
    betas: list[Array] = []
    for step in range(num_steps):
        basis.append(q)
        product = A @ q
        alphas.append(xnp.sum(q * product, axis=0))
        if step == num_steps - 1:
            break
        w = orthogonalize(product, basis, xnp)
        beta = xnp.norm(w, axis=0)
        broken = beta <= threshold * xnp.norm(product, axis=0)
        safe = xnp.where(broken, xnp.ones_like(beta), beta)
        beta = xnp.where(broken, xnp.zeros_like(beta), beta)
        q = xnp.where(broken[None, :], xnp.zeros_like(w), w / safe[None, :])
        betas.append(beta)
    alpha = xnp.stack(alphas, axis=0)
    beta = xnp.stack(betas, axis=0) if betas else alpha[:0]
    return alpha, beta


def tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return eigenvalues ``(p, s)`` and eigenvectors ``(p, s, s)`` of each column's ``T``.

    In NumPy: the tridiagonals are tiny, and a framework would compile its ``eigh`` anew
    for every size ``s`` met along the iteration.
    """
    steps = alpha.shape[0]
    matrices = np.zeros((alpha.shape[1], steps, steps))
    diagonal = np.arange(steps)
    matrices[:, diagonal, diagonal] = alpha.T
    matrices[:, diagonal[:-1], diagonal[1:]] = beta.T
    matrices[:, diagonal[1:], diagonal[:-1]] = beta.T
    return np.linalg.eigh(matrices)


def gauss_quadrature(A: LinearOperator, start: Array, num_steps: int) -> tuple[Array, Array]:
    """Return the nodes ``θ`` and weights ``τ²`` ``(p, s)`` of the Lanczos quadrature rule.

    For a unit vector ``q``, ``qᵀ f(A) q ≈ Σ_i τ_i² f(θ_i)``, exact for polynomials of
    degree ``< 2s``; ``τ_i`` is the first entry of the ``i``-th eigenvector of ``T_s``.
    Returned as arrays of ``A``'s backend.
    """
    xnp = A.xnp
    steps = min(num_steps, A.shape[0])
    alpha, beta = lanczos_tridiagonals(A, start, steps)
    nodes, vectors = tridiagonal_eigh(_numpy(alpha, xnp), _numpy(beta, xnp))
    weights = vectors[:, 0, :] ** 2
    return (
        xnp.array(nodes, dtype=A.dtype, device=A.device),
        xnp.array(weights, dtype=A.dtype, device=A.device),
    )


def _numpy(array: Array, xnp: Any) -> np.ndarray:
    """Return ``array`` as a float64 NumPy array."""
    return np.asarray(xnp.to_np(array), dtype=np.float64)


def select(values: Array, k: int, which: str, xnp: Any) -> Array:
    """Return the indices (an integer array) of the ``k`` entries ``which`` orders first."""
    key = xnp.abs(values) if which in ("LM", "SM") else values
    order = xnp.argsort(-key if which in ("LM", "LA") else key)
    return order[:k]


def check_which(A: LinearOperator, k: int, which: str) -> None:
    """Raise ``ValueError`` on an unknown ``which`` or ``k`` outside ``1..D``."""
    if which not in ORDERS:
        raise ValueError(f"which must be one of {ORDERS}, got {which!r}.")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= A.shape[0]:
        raise ValueError(f"k must be an integer in 1..{A.shape[0]}, got {k!r}.")


def _restart_vector(A: LinearOperator, basis: list[Array], draw: Callable[[], Array]) -> Array:
    """Return a random unit vector orthogonal to ``basis`` (the restart after breakdown)."""
    xnp = A.xnp
    w = orthogonalize(draw(), basis, xnp)
    return w / xnp.norm(w, axis=0, keepdims=True)


def lanczos_eigenpairs(
    A: LinearOperator,
    k: int,
    which: str,
    *,
    tol: float | None,
    max_iters: int,
    seed: int,
    on_failure: str,
) -> tuple[Array, Array]:
    """Return ``k`` eigenvalues of symmetric ``A`` ordered by ``which`` and eigenvectors ``(D, k)``.

    Ritz pairs ``(θ_i, Q s_i)`` of ``T_j`` have residual ``‖A Q s_i − θ_i Q s_i‖ =
    β_j |s_{j,i}|``; iteration stops once the ``k`` wanted ones are below
    ``tol · max|θ|`` (after at least ``2k + 10`` steps, so that a few unwanted Ritz values
    separate the wanted ones from the rest), or after ``min(max_iters, D)`` steps, which
    warns or raises (per ``on_failure``) with the residual reached. After ``D`` steps the
    basis is complete and the pairs are exact to rounding.

    Like every single-vector Krylov method, Lanczos sees an eigenvalue of multiplicity
    ``> 1`` once until the Krylov space is exhausted (a breakdown, after which the
    restart finds the further copies): converged pairs are eigenpairs, but a repeated
    extreme eigenvalue can be under-counted before ``D`` steps.
    """
    check_which(A, k, which)
    xnp = A.xnp
    dimension = A.shape[0]
    tol = float(xnp.finfo(A.dtype).eps) ** (2 / 3) if tol is None else tol
    threshold = breakdown_threshold(A)
    rng = random_source(A, seed)
    like = xnp.zeros((1,), dtype=A.dtype, device=A.device)

    def draw() -> Array:
        return rng.normal((dimension, 1), like)

    q = _restart_vector(A, [], draw)
    basis: list[Array] = []
    alphas: list[float] = []
    betas: list[float] = []
    steps = min(max_iters, dimension)
    min_steps = min(steps, 2 * k + 10)
    for step in range(steps):
        basis.append(q)
        product = A @ q
        alphas.append(float(xnp.sum(q * product, axis=0)[0]))
        w = orthogonalize(product, basis, xnp)
        beta = float(xnp.norm(w, axis=0)[0])
        broken = beta <= threshold * float(xnp.norm(product, axis=0)[0])
        residual_scale = 0.0 if broken or step == dimension - 1 else beta
        values, vectors = tridiagonal_eigh(np.array([alphas]).T, np.array([betas]).T)
        values, vectors = values[0], vectors[0]
        wanted = select(values, min(k, step + 1), which, np)
        residuals = np.abs(residual_scale * vectors[-1, wanted])
        scale = float(np.abs(values).max())
        converged = step + 1 >= min_steps and float(residuals.max()) <= tol * scale
        if converged or step == steps - 1:
            break
        if broken:
            q = _restart_vector(A, basis, draw)
            betas.append(0.0)
        else:
            q = w / beta
            betas.append(beta)
    if not converged:
        worst = float(residuals.max()) / scale if scale > 0 else float("inf")
        report_failure(
            f"Lanczos found {len(wanted)} of {k} eigenpairs ({which}) with relative residual "
            f"{worst:.2e} > tol={tol:.1e} after {steps} steps; raise max_iters "
            f"(the operator has D={dimension}).",
            on_failure,
        )
    coefficients = xnp.array(vectors[:, wanted], dtype=A.dtype, device=A.device)
    ritz_vectors = xnp.concat(basis, axis=1) @ coefficients
    return xnp.array(values[wanted], dtype=A.dtype, device=A.device), ritz_vectors


__all__ = [
    "ORDERS",
    "check_which",
    "gauss_quadrature",
    "lanczos_eigenpairs",
    "lanczos_tridiagonals",
    "orthogonalize",
    "select",
]
