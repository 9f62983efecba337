"""Conjugate gradients (Hestenes & Stiefel 1952) for symmetric positive definite ``A X = B``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract
from cola_curvature.matfree._loops import iterate
from cola_curvature.matfree.solvers import KrylovSolver, safe_divisor
from cola_curvature.types import Array


@dataclass(frozen=True)
class CG(KrylovSolver):
    """Conjugate gradients for ``A x = b`` with ``A`` symmetric positive definite.

    Stops a column when ``‖b − A x‖ ≤ tol ‖b‖`` (recursively updated residual); all
    columns of ``B`` are solved together, one product with ``A`` per iteration. Inside
    ``jax.jit`` the iterations are one compiled ``while_loop`` (at most ``max_iters``,
    ending once every column is below ``tol``), and ``jax.grad`` of ``inv(A) @ b``
    differentiates the solution implicitly (one more solve) rather than the loop.

    Args:
        tol: Relative residual at which a column has converged.
        max_iters: Iterations (products with ``A``) at most.
        on_failure: ``"warn"`` (a :class:`~cola_curvature.ConvergenceWarning`
            naming the residual reached) or ``"raise"`` (a
            :class:`~cola_curvature.ConvergenceError`) when a column has not
            converged after ``max_iters`` iterations. Inside ``jax.jit`` the warning
            comes when the compiled function runs (``jax.debug.callback``), and
            ``"raise"`` returns the unconverged columns as NaN.

    """

    def iterate(self, A: LinearOperator, B: Array) -> tuple[Array, dict]:
        """Run conjugate gradients on ``A X = B``, all columns together.

        Per column: ``α = rᵀr / pᵀAp``, ``x += α p``, ``r −= α A p``, ``p = r + (r'ᵀr'/rᵀr) p``;
        the error in the ``A``-norm falls at least as ``2 ((√κ − 1)/(√κ + 1))^j``. Inside
        ``jax.jit`` a column meeting ``pᵀAp ≤ 0`` is frozen and returned as NaN with
        residual NaN.

        Raises:
            ValueError: when ``pᵀ A p ≤ 0`` on an active column: ``A`` is not positive
                definite (use :class:`~cola_curvature.matfree.minres.MINRES`).

        """
        xnp = A.xnp
        b_norm = safe_divisor(xnp.norm(B, axis=0), xnp)
        traced = is_abstract(b_norm)
        zeros = xnp.zeros_like(b_norm)

        def moving(state: tuple) -> Array:
            rr, indefinite = state[3], state[4]
            return (xnp.sqrt(rr) / b_norm > self.tol) & ~indefinite

        def step(_: Any, state: tuple) -> tuple:
            X, R, P, rr, indefinite = state
            active = moving(state)
            AP = A @ P
            curvature = xnp.sum(P * AP, axis=0)
            negative = active & (curvature <= 0)
            if not traced and bool(xnp.any(negative)):
                raise ValueError(
                    "CG met pᵀAp <= 0: the operator is not positive definite. Damp it "
                    "(A + λ I) or solve with cola_curvature.MINRES()."
                )
            active = active & ~negative
            alpha = xnp.where(active, rr / safe_divisor(curvature, xnp), zeros)
            X = X + alpha * P
            R = R - alpha * AP
            rr_next = xnp.sum(R * R, axis=0)
            P = R + xnp.where(active, rr_next / safe_divisor(rr, xnp), zeros) * P
            rr = xnp.where(active, rr_next, rr)
            return X, R, P, rr, indefinite | negative

        start = (xnp.zeros_like(B), B, B, xnp.sum(B * B, axis=0), b_norm < 0)
        iterations, (X, _, _, rr, indefinite) = iterate(
            step, start, self.max_iters, xnp, traced=traced, done=lambda s: ~xnp.any(moving(s))
        )
        residual = xnp.sqrt(rr) / b_norm
        if traced:
            X = xnp.where(indefinite[None, :], X + float("nan"), X)
            residual = xnp.where(indefinite, residual + float("nan"), residual)
        return X, {"iterations": iterations, "relative_residual": residual}
