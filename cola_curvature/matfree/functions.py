"""Spectral functions ``f(A) V`` of a symmetric operator known by its products (Lanczos).

For a unit start vector ``q₁ = v / ‖v‖``, ``s`` Lanczos steps give ``A Q_s = Q_s T_s +
β_s q_{s+1} e_sᵀ``, and ``f(A) v ≈ ‖v‖ Q_s f(T_s) e₁``, exact when ``f`` is a polynomial of
degree ``< s`` on the spectrum (Saad 1992; the same approximation as matfree's
``funm_lanczos``). ``f(T_s) e₁ = P f(Θ) Pᵀ e₁`` from the eigendecomposition ``T_s = P Θ Pᵀ``.
The basis is reorthogonalised fully (see :mod:`~cola_curvature.matfree.krylov`), so the
approximation converges as Gauss quadrature does: geometrically in ``s`` for ``f``
analytic on the spectrum (``√x`` and ``1/√x`` of a damped PSD operator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cola.annotations import SelfAdjoint
from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract
from cola_curvature.matfree._arguments import check_solver
from cola_curvature.matfree._convergence import report_failure
from cola_curvature.matfree.interface import MatrixFunctionMethod
from cola_curvature.matfree.krylov import _lanczos_step, _numpy, tridiagonal_eigh
from cola_curvature.types import Array


@dataclass(frozen=True)
class LanczosFunction(MatrixFunctionMethod):
    """Lanczos for ``f(A) v`` of a symmetric operator (``sqrt``, ``isqrt``, any spectral ``f``).

    ``f(A) v ≈ ‖v‖ Q_s f(T_s) e₁`` from ``s`` Lanczos steps started at ``v / ‖v‖`` (fully
    reorthogonalised), exact for polynomials of degree ``< s``. Stops once the result
    changes by at most ``tol`` (relative) from one step to the next, in every column, or
    after ``min(max_iters, D)`` steps (then warns or raises per ``on_failure``). One
    product with ``k`` columns per step, ``O(s D k)`` memory for the basis.

    Args:
        tol: Relative change of ``f(A) v`` between steps at which a column has converged.
        max_iters: Lanczos steps at most (capped at ``D``).
        on_failure: As in :class:`~cola_curvature.matfree.cg.CG`.

    """

    tol: float = 1e-10
    max_iters: int = 1000
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        check_solver(self.tol, self.max_iters, self.on_failure)

    def apply(self, A: LinearOperator, f: Callable[[Array], Array], V: Array) -> Array:
        """Return ``f(A) V ≈ ‖v‖ Q_s f(T_s) e₁`` per column (:func:`lanczos_function_matmat`)."""
        return lanczos_function_matmat(A, f, V, self)


def lanczos_function_matmat(
    A: LinearOperator, f: Callable[[Array], Array], V: Array, alg: LanczosFunction
) -> Array:
    """Return ``f(A) V`` for symmetric ``A`` and ``V`` of shape ``(D, k)``, column by column.

    All columns run together (one product with ``k`` columns per step); a column whose
    Krylov space becomes invariant (breakdown) continues with zero vectors, which leaves
    its result unchanged. Each step forms the current approximation and stops when every
    column moved by at most ``alg.tol`` relative to its norm.

    Raises:
        NotImplementedError: inside ``jax.jit`` (the steps are chosen from values).
    """
    xnp = A.xnp
    if is_abstract(xnp.norm(V)):
        raise NotImplementedError(
            "f(A) @ V by Lanczos chooses its number of steps from values and cannot run "
            "inside jax.jit; apply it outside, or pass alg=cola.linalg.Eigh() for a dense "
            "decomposition."
        )
    norms = xnp.norm(V, axis=0)
    zero = norms == 0
    q = V / xnp.where(zero, xnp.ones_like(norms), norms)[None, :]
    basis: list[Array] = []
    alphas: list[np.ndarray] = []
    betas: list[np.ndarray] = []
    previous = None
    steps = min(alg.max_iters, A.shape[0])
    for step in range(steps):
        basis, alpha, w, beta, broken = _lanczos_step(A, basis, step, q)
        alphas.append(_numpy(alpha, xnp))
        current = _combination(basis, alphas, betas, f, norms, xnp)
        if previous is not None:
            change = xnp.norm(current - previous, axis=0)
            scale = xnp.norm(current, axis=0)
            if bool((change <= alg.tol * scale).all()):
                return current
        if bool(broken.all()):
            return current
        previous = current
        safe = xnp.where(broken, xnp.ones_like(beta), beta)
        q = xnp.where(broken[None, :], xnp.zeros_like(w), w / safe[None, :])
        betas.append(_numpy(xnp.where(broken, xnp.zeros_like(beta), beta), xnp))
    worst = float(xnp.max(change / xnp.where(scale > 0, scale, xnp.ones_like(scale))))
    report_failure(
        f"Lanczos for f(A) @ V stopped after {steps} steps with a relative change of "
        f"{worst:.2e} in the last step, above tol={alg.tol:g}; raise "
        "cc.LanczosFunction(max_iters=...) or damp the operator (a wider spectrum needs "
        "more steps).",
        alg.on_failure,
    )
    return current


def _combination(
    basis: list[Array],
    alphas: list[np.ndarray],
    betas: list[np.ndarray],
    f: Callable[[Array], Array],
    norms: Array,
    xnp: Any,
) -> Array:
    """Return ``‖v‖ Q_s P f(Θ) Pᵀ e₁`` for the tridiagonals built so far."""
    empty = np.zeros((0, alphas[0].shape[0]))
    nodes, vectors = tridiagonal_eigh(np.stack(alphas), np.stack(betas) if betas else empty)
    like = basis[0]
    nodes = xnp.array(nodes, dtype=like.dtype, device=xnp.get_device(like))
    vectors = xnp.array(vectors, dtype=like.dtype, device=xnp.get_device(like))
    coefficients = xnp.sum(vectors * (f(nodes) * vectors[:, 0, :])[:, None, :], axis=2)
    combined = sum(q * coefficients[:, j][None, :] for j, q in enumerate(basis))
    return combined * norms[None, :]


class MatrixFunction(LinearOperator):
    """``f(A)`` of a symmetric operator as a CoLA operator: each ``@`` runs ``alg.apply``.

    With :class:`LanczosFunction`, see :func:`lanczos_function_matmat`. ``SelfAdjoint``.
    """

    def __init__(
        self, A: LinearOperator, f: Callable[[Array], Array], alg: MatrixFunctionMethod
    ) -> None:
        super().__init__(A.dtype, A.shape, annotations={SelfAdjoint})
        self.A = A
        self.f = f
        self.alg = alg

    def _matmat(self, X: Array) -> Array:
        return self.alg.apply(self.A, self.f, X)

    def _rmatmat(self, X: Array) -> Array:
        return self._matmat(X.T).T

    def __str__(self) -> str:
        return f"f({self.A})"
