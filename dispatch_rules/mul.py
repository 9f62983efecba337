"""Scalar multiples of Kronecker-factored operators keep the structure."""

from __future__ import annotations

from typing import Any

from plum import dispatch

from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank


# c · P ⊕_l B_l Pᵀ = P ⊕_l (c B_l) Pᵀ, c (G ⊗ A) = (c G) ⊗ A,
# c (diag(d) + U M Uᵀ) = diag(c d) + U (c M) Uᵀ
@dispatch(precedence=1)
def mul(A: KroneckerFactored | DiagonalPlusLowRank, c: Any):
    """Return ``c K`` as a Kronecker-factored operator (``c`` a number or 0-d array)."""
    return A.scaled(c)
