"""``A + λI`` keeps the structure: eigen-damping for Kronecker factors, a shift type otherwise.

KroneckerFactored is itself a ``BlockDiag``; its rules are listed first and win by type.
Matrix-free curvature operators become :class:`ShiftedCurvature`, which the matrix-free
rules recognise in either order of the sum.
"""

from __future__ import annotations

from typing import Any

from cola.ops import BlockDiag, Identity, Kronecker, Product, ScalarMul, Sum
from plum import dispatch

from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators.kronecker import KroneckerFactored, as_kronecker_factored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import ShiftedCurvature


def _identity_multiple(op: Any) -> Any:
    """Return ``λ`` of ``λ I`` given as ``Identity``, ``ScalarMul`` or ``ScalarMul · Identity``."""
    if isinstance(op, Identity):
        return 1.0
    if isinstance(op, ScalarMul):
        return op.c
    return op.Ms[0].c


# (Q_G⊗Q_A) S (Q_G⊗Q_A)ᵀ + λI = (Q_G⊗Q_A)(S + λ)(Q_G⊗Q_A)ᵀ
@dispatch(precedence=1)
def add(A: KroneckerFactored, B: Identity | ScalarMul | Product[ScalarMul, Identity]):
    """Return ``K + λ I`` as a Kronecker-factored operator."""
    return A.damped(_identity_multiple(B), mode="exact")


# λI + K = K + λI
@dispatch(precedence=1)
def add(A: Identity | ScalarMul | Product[ScalarMul, Identity], B: KroneckerFactored):  # noqa: F811
    """Return ``λ I + K`` as a Kronecker-factored operator."""
    return B.damped(_identity_multiple(A), mode="exact")


def _damped_or_sum(structured_source: Any, other: Any, identity_multiple: Any) -> Any:
    """Return the user-built operator damped in Kronecker-factored form, else CoLA's ``Sum``."""
    structured = as_kronecker_factored(structured_source)
    if structured is None:
        return Sum(structured_source, other)
    return structured.damped(_identity_multiple(identity_multiple), mode="exact")


# Kronecker(G, A) + λI = (Q_G⊗Q_A)(Λ_G ⊗ Λ_A + λ)(Q_G⊗Q_A)ᵀ, for symmetric dense G, A
@dispatch(precedence=1)
def add(A: Kronecker | BlockDiag, B: Identity | ScalarMul | Product[ScalarMul, Identity]):  # noqa: F811
    """Return a user-built Kronecker / block-diagonal operator plus ``λ I``, structured if can."""
    return _damped_or_sum(A, B, B)


# λI + Kronecker(G, A) = Kronecker(G, A) + λI
@dispatch(precedence=1)
def add(A: Identity | ScalarMul | Product[ScalarMul, Identity], B: Kronecker | BlockDiag):  # noqa: F811
    """Return ``λ I`` plus a user-built Kronecker / block-diagonal operator."""
    return _damped_or_sum(B, A, A)


# A + λI, for A known only through its products
@dispatch(precedence=1)
def add(A: CurvatureOperator, B: Identity | ScalarMul | Product[ScalarMul, Identity]):  # noqa: F811
    """Return ``A + λ I`` as a :class:`ShiftedCurvature`."""
    return ShiftedCurvature(A, _identity_multiple(B))


# λI + A = A + λI
@dispatch(precedence=1)
def add(A: Identity | ScalarMul | Product[ScalarMul, Identity], B: CurvatureOperator):  # noqa: F811
    """Return ``λ I + A`` as a :class:`ShiftedCurvature`."""
    return ShiftedCurvature(B, _identity_multiple(A))


# (A + λI) + μI = A + (λ + μ)I
@dispatch(precedence=1)
def add(A: ShiftedCurvature, B: Identity | ScalarMul | Product[ScalarMul, Identity]):  # noqa: F811
    """Return ``(A + λ I) + μ I`` as one :class:`ShiftedCurvature`."""
    return A.shifted(_identity_multiple(B))


# μI + (A + λI) = A + (λ + μ)I
@dispatch(precedence=1)
def add(A: Identity | ScalarMul | Product[ScalarMul, Identity], B: ShiftedCurvature):  # noqa: F811
    """Return ``μ I + (A + λ I)`` as one :class:`ShiftedCurvature`."""
    return B.shifted(_identity_multiple(A))


# (diag(d) + U M Uᵀ) + λI = diag(d + λ) + U M Uᵀ, in either order
@dispatch(precedence=1)
def add(A: DiagonalPlusLowRank, B: Identity | ScalarMul | Product[ScalarMul, Identity]):  # noqa: F811
    """Return ``diag(d + λ) + U M Uᵀ``."""
    return A.damped(_identity_multiple(B))


@dispatch(precedence=1)
def add(A: Identity | ScalarMul | Product[ScalarMul, Identity], B: DiagonalPlusLowRank):  # noqa: F811
    """Return ``λ I + diag(d) + U M Uᵀ``."""
    return B.damped(_identity_multiple(A))
