"""Truncated Neumann series (Richardson iteration) for ``A X = B``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract
from cola_curvature.matfree._loops import iterate
from cola_curvature.matfree._random import gaussian
from cola_curvature.matfree.krylov import gauss_quadrature
from cola_curvature.matfree.solvers import IterativeSolver, safe_divisor
from cola_curvature.types import Array


def largest_eigenvalue_estimate(A: LinearOperator, num_steps: int = 20, seed: int = 0) -> Any:
    """Return the largest Ritz value of ``num_steps`` Lanczos steps (a lower bound on ``λ_max``).

    A ``float`` eagerly, a scalar array inside ``jax.jit``.
    """
    nodes, _ = gauss_quadrature(A, gaussian(A, 1, seed), num_steps)
    largest = nodes.max()
    return largest if is_abstract(largest) else float(largest)


@dataclass(frozen=True)
class Neumann(IterativeSolver):
    """Truncated Neumann series ``A⁻¹ b ≈ α Σ_{j<J} (I − α A)^j b`` (Richardson iteration).

    Converges when every eigenvalue ``λ`` of ``A`` satisfies ``0 < α λ < 2``; with
    ``step=None``, ``α = 1 / λ_max`` with ``λ_max`` from a few Lanczos steps. The error
    contracts by ``max|1 − α λ|`` per term, i.e. by ``1 − λ_min/λ_max``: slow on
    ill-conditioned operators, which is why :class:`~cola_curvature.matfree.cg.CG` is
    the default.

    Args:
        tol: Relative residual at which a column has converged.
        max_iters: Terms ``J`` of the series at most.
        step: ``α``; ``None`` estimates it.
        on_failure: As in :class:`~cola_curvature.matfree.cg.CG`.

    """

    tol: float = 1e-10
    max_iters: int = 1000
    step: float | None = None
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step is not None and not self.step > 0:
            raise ValueError(f"step must be > 0 or None, got {self.step!r}.")

    def iterate(self, A: LinearOperator, B: Array) -> tuple[Array, dict]:
        """Sum the series: ``x_{j+1} = x_j + α r_j``, ``r_{j+1} = (I − α A) r_j``.

        So ``x_J = α Σ_{j<J} (I − α A)^j b``. ``α`` defaults to ``1 / θ_max`` (largest
        Ritz value of 20 Lanczos steps); the series diverges when some ``α λ ∉ (0, 2)``,
        and stops early once the residual has grown by ``10³``. ``info["step"]`` is ``α``.
        """
        xnp = A.xnp
        step_size = self.step if self.step is not None else 1 / largest_eigenvalue_estimate(A)
        b_norm = safe_divisor(xnp.norm(B, axis=0), xnp)

        def step(_: Any, state: tuple) -> tuple:
            X, R, residual = state
            active = residual > self.tol
            X = X + xnp.where(active, step_size + 0 * residual, 0 * residual) * R
            R = xnp.where(active[None, :], R - step_size * (A @ R), R)
            return X, R, xnp.norm(R, axis=0) / b_norm

        def done(state: tuple) -> Array:
            residual = state[2]
            return ~xnp.any(residual > self.tol) | (residual.max() > 1e3)

        start = (xnp.zeros_like(B), B, xnp.norm(B, axis=0) / b_norm)
        iterations, (X, _, residual) = iterate(
            step, start, self.max_iters, xnp, traced=is_abstract(b_norm), done=done
        )
        return X, {"iterations": iterations, "relative_residual": residual, "step": step_size}
