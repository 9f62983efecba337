"""Traces: exact for Kronecker factors, randomized estimators for matrix-free operators."""

from __future__ import annotations

from cola.linalg import Algorithm, Auto
from plum import dispatch

from cola_curvature.algorithms import Hutchinson, HutchPlusPlus, XTrace
from cola_curvature.estimators import hutchinson_trace, hutchpp_trace, xtrace
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import CurvatureSum, ShiftedCurvature

_ESTIMATORS = {Hutchinson: hutchinson_trace, HutchPlusPlus: hutchpp_trace, XTrace: xtrace}


# tr(P ⊕_l (G_l⊗A_l) Pᵀ) = Σ_l tr(G_l) tr(A_l);  tr(diag(d) + U M Uᵀ) = Σ d + tr(M UᵀU)
@dispatch(precedence=1)
def trace(A: KroneckerFactored | DiagonalPlusLowRank, alg: Algorithm):
    """Return the trace exactly."""
    return A.trace()


# tr A ≈ randomized estimate from products A Ω with many columns
@dispatch(precedence=1)
def trace(A: CurvatureOperator, alg: Auto | Hutchinson | HutchPlusPlus | XTrace):  # noqa: F811
    """Return a randomized estimate of ``tr A``; ``Auto`` means ``XTrace()`` (60 products).

    ``cola.linalg.Exact()`` still gives the exact trace from ``D`` unit vectors.
    """
    estimator = XTrace() if isinstance(alg, Auto) else alg
    return _ESTIMATORS[type(estimator)](A, estimator)


# tr(c A + λI) = c tr A + λ D
@dispatch(precedence=1)
def trace(A: ShiftedCurvature, alg: Auto | Hutchinson | HutchPlusPlus | XTrace):  # noqa: F811
    """Return ``c`` times the estimate of ``tr A`` plus the exact ``λ D``."""
    return A.scale * trace(A.base, alg) + A.shift * A.shape[0]


# tr(Σ_i c_i A_i + λI) = Σ_i c_i tr A_i + λ D
@dispatch(precedence=1)
def trace(A: CurvatureSum, alg: Auto | Hutchinson | HutchPlusPlus | XTrace):  # noqa: F811
    """Return the terms' traces (exact for structured terms, else estimated) plus ``λ D``."""
    total = A.shift * A.shape[0]
    for c, term in A.terms:
        total = total + c * trace(term, alg)
    return total
