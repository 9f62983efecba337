"""MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite ``A X = B``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract
from cola_curvature.matfree._loops import iterate
from cola_curvature.matfree.solvers import KrylovSolver, safe_divisor
from cola_curvature.types import Array


@dataclass(frozen=True)
class MINRES(KrylovSolver):
    """MINRES (Paige & Saunders 1975) for ``A x = b`` with ``A`` symmetric, possibly indefinite.

    Minimises ``‖b − A x‖`` over the Krylov space; the residual norm it tracks is the
    stopping criterion ``‖b − A x‖ ≤ tol ‖b‖``. Knobs as in
    :class:`~cola_curvature.matfree.cg.CG`.
    """

    def iterate(self, A: LinearOperator, B: Array) -> tuple[Array, dict]:
        """Run MINRES on ``A X = B`` (``A`` nonsingular), all columns together.

        Lanczos on ``A`` with the QR factorisation of its tridiagonal updated by Givens
        rotations (as in SciPy's ``minres`` without preconditioner): ``x_j`` minimises
        ``‖b − A x‖`` over the ``j``-dimensional Krylov space, and the rotated right-hand
        side ``φ̄_j`` is that residual's norm.
        """
        xnp = A.xnp
        eps = float(xnp.finfo(A.dtype).eps)
        beta_first = xnp.norm(B, axis=0)
        b_norm = safe_divisor(beta_first, xnp)
        zeros = xnp.zeros_like(beta_first)

        def moving(state: tuple) -> Array:
            beta, phi_bar = state[4], state[8]
            return (phi_bar / b_norm > self.tol) & (beta > 0)

        def step(_: Any, state: tuple) -> tuple:
            X, r_previous, r_current, y, beta, beta_old, delta_bar, epsilon, phi_bar = state[:9]
            cosine, sine, w, w_previous = state[9:]
            active = moving(state)
            v = y / safe_divisor(beta, xnp)
            y = A @ v
            # the three-term recurrence; β_old = 0 only before the first step
            previous_scale = beta / safe_divisor(beta_old, xnp)
            y = y - xnp.where(beta_old != 0, previous_scale, zeros) * r_previous
            alpha = xnp.sum(v * y, axis=0)
            y = y - (alpha / safe_divisor(beta, xnp)) * r_current
            r_previous, r_current = r_current, y
            beta_old, beta = beta, xnp.norm(y, axis=0)
            epsilon_old = epsilon
            delta = cosine * delta_bar + sine * alpha
            gamma_bar = sine * delta_bar - cosine * alpha
            epsilon = sine * beta
            delta_bar = -cosine * beta
            gamma = xnp.maximum(xnp.sqrt(gamma_bar**2 + beta**2), zeros + eps)
            cosine, sine = gamma_bar / gamma, beta / gamma
            phi = cosine * phi_bar
            w_older, w_previous = w_previous, w
            w = (v - epsilon_old * w_older - delta * w_previous) / gamma
            X = X + xnp.where(active, phi, zeros) * w
            phi_bar = xnp.where(active, sine * phi_bar, phi_bar)
            recurrence = (X, r_previous, r_current, y, beta, beta_old, delta_bar, epsilon)
            return (*recurrence, phi_bar, cosine, sine, w, w_previous)

        empty = xnp.zeros_like(B)
        start = (empty, B, B, B, beta_first, zeros, zeros, zeros, beta_first, zeros - 1, zeros)
        iterations, state = iterate(
            step,
            start + (empty, empty),
            self.max_iters,
            xnp,
            traced=is_abstract(beta_first),
            done=lambda s: ~xnp.any(moving(s)),
        )
        return state[0], {"iterations": iterations, "relative_residual": state[8] / b_norm}
