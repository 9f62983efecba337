"""Scalar multiples keep the structure: Kronecker factors scaled, matrix-free ones scaled lazily."""

from __future__ import annotations

from typing import Any

from plum import dispatch

from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import CurvatureSum, ShiftedCurvature


# c · P ⊕_l B_l Pᵀ = P ⊕_l (c B_l) Pᵀ, c (G ⊗ A) = (c G) ⊗ A,
# c (diag(d) + U M Uᵀ) = diag(c d) + U (c M) Uᵀ
@dispatch(precedence=1)
def mul(A: KroneckerFactored | DiagonalPlusLowRank | ShiftedCurvature | CurvatureSum, c: Any):
    """Return ``c K`` in ``K``'s own structure (``c`` a number or 0-d array)."""
    return A.scaled(c)


# c · A = c A + 0 I, for A known only through its products
@dispatch(precedence=1)
def mul(A: CurvatureOperator, c: Any):  # noqa: F811
    """Return ``c A`` as a :class:`ShiftedCurvature` (no shift)."""
    return ShiftedCurvature(A, 0.0, c)
