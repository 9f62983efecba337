"""Hutchinson's estimator (Hutchinson 1989) of the trace, the diagonal and ``‖A‖_F²``."""

from __future__ import annotations

from dataclasses import dataclass

from cola.ops import LinearOperator

from cola_curvature.matfree._arguments import check_positive, check_square
from cola_curvature.matfree._random import rademacher
from cola_curvature.matfree.interface import DiagonalEstimator, TraceEstimator
from cola_curvature.types import Array


@dataclass(frozen=True)
class Hutchinson(TraceEstimator, DiagonalEstimator):
    """Hutchinson's estimator: ``tr A ≈ (1/m) Σ_j z_jᵀ A z_j``, ``diag A ≈ (1/m) Σ_j z_j ⊙ A z_j``.

    Rademacher ``z_j``; unbiased, error ``O(‖A‖_F / √m)``. One product with ``m`` columns.
    """

    num_matvecs: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("num_matvecs", self.num_matvecs)

    def _probes(self, A: LinearOperator) -> tuple[Array, Array]:
        """Return the Rademacher probes ``Z`` ``(D, m)`` and the product ``A Z``."""
        check_square(A)
        Z = rademacher(A, self.num_matvecs, self.seed)
        return Z, A @ Z

    def trace(self, A: LinearOperator) -> Array:
        """Return ``(1/m) Σ_j z_jᵀ A z_j`` (unbiased; ``m`` products)."""
        Z, AZ = self._probes(A)
        return A.xnp.sum(Z * AZ, axis=(0, 1)) / self.num_matvecs

    def diagonal(self, A: LinearOperator) -> Array:
        """Return ``(1/m) Σ_j z_j ⊙ A z_j`` (unbiased; ``m`` products)."""
        Z, AZ = self._probes(A)
        return A.xnp.sum(Z * AZ, axis=1) / self.num_matvecs

    def frobenius_norm_squared(self, A: LinearOperator) -> Array:
        """Return ``(1/m) Σ_j ‖A z_j‖²``, unbiased for ``‖A‖_F² = tr(AᵀA)`` (``m`` products)."""
        _, AZ = self._probes(A)
        return A.xnp.sum(AZ**2, axis=(0, 1)) / self.num_matvecs
