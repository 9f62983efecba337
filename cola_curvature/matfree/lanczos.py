"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation."""

from __future__ import annotations

from dataclasses import dataclass

from cola.ops import LinearOperator

from cola_curvature.matfree._arguments import check_solver
from cola_curvature.matfree.interface import EigenSolver
from cola_curvature.matfree.krylov import lanczos_eigenpairs
from cola_curvature.types import Array


@dataclass(frozen=True)
class LanczosEig(EigenSolver):
    """Lanczos with full reorthogonalisation for extreme eigenpairs of a symmetric operator.

    Runs until the ``k`` wanted Ritz pairs have residuals ``‖A y − θ y‖ ≤ tol · max|θ|``;
    when the Krylov space becomes invariant (breakdown), it restarts from a random
    vector orthogonal to all previous ones, so repeated eigenvalues are found with their
    multiplicity. One product with one column per step. Inside ``jax.jit`` it runs
    exactly ``min(max_iters, D)`` steps and checks ``tol`` when the compiled function runs.

    Args:
        tol: Relative Ritz residual at which an eigenpair has converged (``None``:
            ``ε^(2/3)`` of the dtype).
        max_iters: Lanczos steps at most (capped at ``D``).
        seed: Seed of the start vector.
        on_failure: As in :class:`~cola_curvature.matfree.cg.CG`.

    """

    tol: float | None = None
    max_iters: int = 500
    seed: int = 0
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        check_solver(1.0 if self.tol is None else self.tol, self.max_iters, self.on_failure)

    def eigs(self, A: LinearOperator, k: int, which: str) -> tuple[Array, Array]:
        """Return ``k`` Ritz values ordered by ``which`` and their Ritz vectors ``(D, k)``.

        Ritz pairs ``(θ_i, Q s_i)`` of the tridiagonal ``T_j = Qᵀ A Q`` (see
        :func:`~cola_curvature.matfree.krylov.lanczos_eigenpairs`).
        """
        return lanczos_eigenpairs(
            A,
            k,
            which,
            tol=self.tol,
            max_iters=self.max_iters,
            seed=self.seed,
            on_failure=self.on_failure,
        )
