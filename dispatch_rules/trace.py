"""Exact traces of Kronecker-factored operators."""

from __future__ import annotations

from cola.linalg import Algorithm
from plum import dispatch

from cola_curvature.operators.kronecker import KroneckerFactored


# tr(P ⊕_l (G_l⊗A_l) Pᵀ) = Σ_l tr(G_l) tr(A_l)
@dispatch(precedence=1)
def trace(A: KroneckerFactored, alg: Algorithm):
    """Return the trace exactly."""
    return A.trace()
