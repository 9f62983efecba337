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

Inside ``jax.jit`` (no values to branch on) the same steps run as one compiled loop over a
preallocated basis, and the small tridiagonal eigenproblems are solved by ``xnp.eigh``
instead of NumPy; :func:`lanczos_eigenpairs` then runs a fixed number of steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract, is_traced
from cola_curvature.matfree._convergence import report_failure, report_failure_traced
from cola_curvature.matfree._loops import iterate
from cola_curvature.matfree._random import random_source
from cola_curvature.types import Array

#: Orders of ``which``: largest / smallest magnitude, largest / smallest algebraic.
ORDERS = ("LM", "SM", "LA", "SA")


def breakdown_threshold(A: LinearOperator) -> float:
    """Return ``β / ‖A q‖`` below which a Lanczos step counts as breakdown (``100 √D ε``)."""
    return 100 * A.shape[0] ** 0.5 * float(A.xnp.finfo(A.dtype).eps)


def orthogonalize(w: Array, basis: list[Array] | Array, xnp: Any) -> Array:
    """Return ``w`` minus its projection on the orthonormal ``basis`` (column-wise, twice).

    ``w`` has shape ``(D, p)``; ``basis`` is a list of ``(D, p)`` entries (eagerly:
    constant shapes, so JAX compiles each operation once) or a ``(j, D, p)`` array (a
    preallocated basis under ``jit``, whose zero entries change nothing). Column ``c`` of
    ``w`` is orthogonalised against column ``c`` of every entry. ``O(j D p)``.
    """
    for _ in range(2):
        if isinstance(basis, list):
            for q in basis:
                w = w - q * xnp.sum(q * w, axis=0, keepdims=True)
        else:
            w = w - xnp.sum(basis * xnp.sum(basis * w[None], axis=1, keepdims=True), axis=0)
    return w


def _container(A: LinearOperator, shape: tuple[int, ...], traced: bool) -> list[Array] | Array:
    """Return storage for ``shape[0]`` entries: a list eagerly, a zero array when traced."""
    return A.xnp.zeros(shape, dtype=A.dtype, device=A.device) if traced else []


def _store(container: list[Array] | Array, value: Array, step: Any, xnp: Any) -> Any:
    """Return ``container`` holding ``value`` as entry ``step`` (appended to a list)."""
    if isinstance(container, list):
        return [*container, value]
    return xnp.update_array(container, value, step)


def _stacked(container: list[Array] | Array, xnp: Any) -> Array:
    """Return the entries of ``container`` as one array (stacked along a new first axis)."""
    return xnp.stack(container, axis=0) if isinstance(container, list) else container


def _lanczos_step(
    A: LinearOperator, basis: list[Array] | Array, step: Any, q: Array
) -> tuple[Any, Array, Array, Array, Array]:
    """Store ``q`` in the basis and take one Lanczos step from it.

    Returns:
        ``(basis, α, w, β, broken)``: ``α = qᵀAq``, ``w`` the product ``A q``
        orthogonalised against the basis, ``β = ‖w‖`` and whether ``β`` counts as
        breakdown (per column).

    """
    xnp = A.xnp
    basis = _store(basis, q, step, xnp)
    product = A @ q
    alpha = xnp.sum(q * product, axis=0)
    w = orthogonalize(product, basis, xnp)
    beta = xnp.norm(w, axis=0)
    broken = beta <= breakdown_threshold(A) * xnp.norm(product, axis=0)
    return basis, alpha, w, beta, broken


def lanczos_tridiagonals(A: LinearOperator, start: Array, num_steps: int) -> tuple[Array, Array]:
    """Run ``num_steps`` Lanczos steps from each column of ``start`` (``(D, p)``), together.

    A column that breaks down continues with zero vectors (its ``β`` is ``0``).

    Returns:
        ``(α, β)`` of shapes ``(s, p)`` and ``(s − 1, p)``: the tridiagonal of each
        column. One product ``A @ Q`` with ``p`` columns per step.

    """
    xnp = A.xnp
    q = start / xnp.norm(start, axis=0, keepdims=True)
    traced = is_abstract(q)
    dimension, columns = q.shape

    def step(index: Any, state: tuple) -> tuple:
        basis, alphas, betas, q = state
        basis, alpha, w, beta, broken = _lanczos_step(A, basis, index, q)
        safe = xnp.where(broken, xnp.ones_like(beta), beta)
        beta = xnp.where(broken, xnp.zeros_like(beta), beta)
        q = xnp.where(broken[None, :], xnp.zeros_like(w), w / safe[None, :])
        alphas = _store(alphas, alpha, index, xnp)
        return basis, alphas, _store(betas, beta, index, xnp), q

    # s − 1 full steps, then only the last α (its β and orthogonalisation are not needed)
    basis = _container(A, (num_steps - 1, dimension, columns), traced)
    alphas = _container(A, (num_steps, columns), traced)
    betas = _container(A, (num_steps - 1, columns), traced)
    _, (_, alphas, betas, q) = iterate(
        step, (basis, alphas, betas, q), num_steps - 1, xnp, traced=traced
    )
    alphas = _store(alphas, xnp.sum(q * (A @ q), axis=0), num_steps - 1, xnp)
    alpha = _stacked(alphas, xnp)
    return alpha, _stacked(betas, xnp) if num_steps > 1 else alpha[:0]


def _tridiagonal_matrices(alpha: Array, beta: Array, xnp: Any) -> Array:
    """Return the ``(p, s, s)`` tridiagonal matrices of ``α`` ``(s, p)``, ``β`` ``(s − 1, p)``."""
    steps = alpha.shape[0]
    eye = xnp.eye(steps, steps, dtype=alpha.dtype, device=None)
    upper = xnp.roll(eye, 1, 1)  # ones above the diagonal, and a wrapped one at (s − 1, 0)
    padded = xnp.concat([beta, 0 * alpha[:1]], axis=0).T  # β_s = 0 cancels the wrapped one
    off_diagonal = padded[:, :, None] * upper[None]
    return alpha.T[:, :, None] * eye[None] + off_diagonal + xnp.permute(off_diagonal, (0, 2, 1))


def tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return eigenvalues ``(p, s)`` and eigenvectors ``(p, s, s)`` of each column's ``T``.

    In NumPy: the tridiagonals are tiny, and a framework would compile its ``eigh`` anew
    for every size ``s`` met along the iteration (inside ``jax.jit`` the sizes are fixed
    and :func:`gauss_quadrature` uses ``xnp.eigh`` instead).
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
    Returned as arrays of ``A``'s backend. The ``s × s`` eigenproblems are solved in
    NumPy eagerly and by ``xnp.eigh`` on traced arrays (inside ``jax.jit`` or
    ``jax.grad``, where NumPy cannot read the values).
    """
    xnp = A.xnp
    steps = min(num_steps, A.shape[0])
    alpha, beta = lanczos_tridiagonals(A, start, steps)
    if is_traced(alpha):
        nodes, vectors = xnp.eigh(_tridiagonal_matrices(alpha, beta, xnp))
        return nodes, vectors[:, 0, :] ** 2
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


def _unit_orthogonal(w: Array, basis: list[Array] | Array, xnp: Any) -> Array:
    """Return ``w`` orthogonalised against ``basis``, normalised (a restart after breakdown)."""
    w = orthogonalize(w, basis, xnp)
    return w / xnp.norm(w, axis=0, keepdims=True)


def _eigen_failure_message(
    found: int, k: int, which: str, steps: int, dimension: int, worst: Any, tol: float
) -> str:
    """Return the message for Lanczos stopping with relative Ritz residual ``worst > tol``."""
    return (
        f"Lanczos found {found} of {k} eigenpairs ({which}) with relative residual "
        f"{float(worst):.2e} > tol={tol:.1e} after {steps} steps; raise max_iters "
        f"(the operator has D={dimension})."
    )


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

    Inside ``jax.jit`` it always runs ``min(max_iters, D)`` steps (the Ritz values of
    every intermediate size would each need their own ``eigh``), so pass a ``max_iters``
    near the steps needed (e.g. ``3k + 20``); the residual test then happens when the
    compiled function runs: a :class:`~cola_curvature.ConvergenceWarning`, and NaN
    results with ``on_failure="raise"``. Cost there: ``s = min(max_iters, D)`` products
    with one column, ``O(s² D)`` for reorthogonalisation, ``O(s D)`` memory for the basis
    and the restart vectors (drawn up front).

    Like every single-vector Krylov method, Lanczos sees an eigenvalue of multiplicity
    ``> 1`` once until the Krylov space is exhausted (a breakdown, after which the
    restart finds the further copies): converged pairs are eigenpairs, but a repeated
    extreme eigenvalue can be under-counted before ``D`` steps.
    """
    check_which(A, k, which)
    xnp = A.xnp
    dimension = A.shape[0]
    tol = float(xnp.finfo(A.dtype).eps) ** (2 / 3) if tol is None else tol
    rng = random_source(A, seed)
    like = xnp.zeros((1,), dtype=A.dtype, device=A.device)
    steps = min(max_iters, dimension)
    q = _unit_orthogonal(rng.normal((dimension, 1), like), [], xnp)
    if is_abstract(q):
        return _fixed_depth_eigenpairs(
            A, k, which, q, rng.normal((steps, dimension, 1), like), tol, on_failure
        )
    basis: list[Array] = []
    alphas: list[float] = []
    betas: list[float] = []
    min_steps = min(steps, 2 * k + 10)
    for step in range(steps):
        basis, alpha, w, beta, broken = _lanczos_step(A, basis, step, q)
        alphas.append(float(alpha[0]))
        beta, broken = float(beta[0]), bool(broken[0])
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
            q = _unit_orthogonal(rng.normal((dimension, 1), like), basis, xnp)
            betas.append(0.0)
        else:
            q = w / beta
            betas.append(beta)
    if not converged:
        worst = float(residuals.max()) / scale if scale > 0 else float("inf")
        report_failure(
            _eigen_failure_message(len(wanted), k, which, steps, dimension, worst, tol),
            on_failure,
        )
    coefficients = xnp.array(vectors[:, wanted], dtype=A.dtype, device=A.device)
    ritz_vectors = xnp.concat(basis, axis=1) @ coefficients
    return xnp.array(values[wanted], dtype=A.dtype, device=A.device), ritz_vectors


def _fixed_depth_eigenpairs(
    A: LinearOperator,
    k: int,
    which: str,
    q: Array,
    restarts: Array,
    tol: float,
    on_failure: str,
) -> tuple[Array, Array]:
    """:func:`lanczos_eigenpairs` on traced arrays: ``s = len(restarts)`` steps in one loop.

    ``restarts`` ``(s, D, 1)`` are drawn before the loop; step ``j`` restarts from the
    ``j``-th (orthogonalised) when it breaks down.
    """
    xnp = A.xnp
    steps, dimension = restarts.shape[0], A.shape[0]

    def step(index: Any, state: tuple) -> tuple:
        basis, alphas, betas, q = state
        basis, alpha, w, beta, broken = _lanczos_step(A, basis, index, q)
        restart = _unit_orthogonal(restarts[index], basis, xnp)
        q = xnp.where(broken[None, :], restart, w / xnp.where(broken, 1 + 0 * beta, beta))
        alphas = xnp.update_array(alphas, alpha, index)
        betas = xnp.update_array(betas, xnp.where(broken, 0 * beta, beta), index)
        return basis, alphas, betas, q

    tridiagonal = xnp.zeros((steps, 1), dtype=A.dtype, device=A.device)
    basis = _container(A, (steps, dimension, 1), traced=True)
    start = (basis, tridiagonal, xnp.zeros_like(tridiagonal), q)
    _, (basis, alpha, beta, _) = iterate(step, start, steps, xnp, traced=True)
    values, vectors = xnp.eigh(_tridiagonal_matrices(alpha, beta[: steps - 1], xnp))
    values, vectors = values[0], vectors[0]
    wanted = select(values, k, which, xnp)
    # the last β is the residual scale (0 after D steps, where the basis is complete)
    residual_scale = beta[steps - 1, 0] if steps < dimension else 0 * beta[0, 0]
    residuals = xnp.abs(residual_scale * vectors[steps - 1][wanted])
    worst = xnp.max(residuals) / xnp.max(xnp.abs(values))
    failed = ~(worst <= tol)
    report_failure_traced(
        failed,
        lambda value: _eigen_failure_message(k, k, which, steps, dimension, value, tol),
        worst,
    )
    ritz_values, ritz_vectors = values[wanted], basis[:, :, 0].T @ vectors[:, wanted]
    if on_failure == "raise":
        ritz_values = xnp.where(failed, ritz_values + float("nan"), ritz_values)
    return ritz_values, ritz_vectors


__all__ = [
    "ORDERS",
    "check_which",
    "gauss_quadrature",
    "lanczos_eigenpairs",
    "lanczos_tridiagonals",
    "orthogonalize",
    "select",
]
