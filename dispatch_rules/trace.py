"""Traces: exact for Kronecker factors, randomized estimators for matrix-free operators."""

from __future__ import annotations

from cola.linalg import Algorithm, Auto
from plum import dispatch

from cola_curvature.matfree import TraceEstimator, XTrace
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import CurvatureSum, ShiftedCurvature


# tr(P ⊕_l (G_l⊗A_l) Pᵀ) = Σ_l tr(G_l) tr(A_l);  tr(diag(d) + U M Uᵀ) = Σ d + tr(M UᵀU)
@dispatch(precedence=1)
def trace(A: KroneckerFactored | DiagonalPlusLowRank, alg: Algorithm):
    """Return the trace exactly."""
    return A.trace()


# tr A ≈ randomized estimate from products A Ω with many columns
@dispatch(precedence=1)
def trace(A: CurvatureOperator, alg: Auto | TraceEstimator):  # noqa: F811
    """Return ``alg.trace(A)``, a randomized estimate of ``tr A``; ``Auto`` means ``XTrace()``.

    Any :class:`~cola_curvature.matfree.TraceEstimator` serves (``cc.Hutchinson``,
    ``cc.HutchPlusPlus``, ``cc.XTrace``, or a new subclass). ``cola.linalg.Exact()`` still
    gives the exact trace from ``D`` unit vectors.
    """
    return (XTrace() if isinstance(alg, Auto) else alg).trace(A)


# tr(c A + λI) = c tr A + λ D
@dispatch(precedence=1)
def trace(A: ShiftedCurvature, alg: Auto | TraceEstimator):  # noqa: F811
    """Return ``c`` times the estimate of ``tr A`` plus the exact ``λ D``."""
    return A.scale * trace(A.base, alg) + A.shift * A.shape[0]


# tr(Σ_i c_i A_i + λI) = Σ_i c_i tr A_i + λ D
@dispatch(precedence=1)
def trace(A: CurvatureSum, alg: Auto | TraceEstimator):  # noqa: F811
    """Return the terms' traces (exact for structured terms, else estimated) plus ``λ D``."""
    total = A.shift * A.shape[0]
    for c, term in A.terms:
        total = total + c * trace(term, alg)
    return total
