"""Sums keep the structure: eigen-damping for Kronecker factors, matrix-free types otherwise.

Operators that own their damping (Kronecker-factored, diagonal plus low rank, shifted,
sums) share one pair of rules; a user-built ``Kronecker`` is converted when it can be,
and a ``BlockDiag`` is damped block by block. Matrix-free curvature operators become
:class:`ShiftedCurvature`, which the matrix-free rules recognise in either order of the
sum; a sum of two curvature operators over the same parameters becomes a
:class:`CurvatureSum`. None of these ever densifies.
"""

from __future__ import annotations

from typing import Any

from cola.ops import BlockDiag, Identity, Kronecker, Product, ScalarMul, Sum
from plum import dispatch

from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._interface import ParameterSpaceInterface
from cola_curvature.operators.kronecker import KroneckerFactored, as_kronecker_factored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import CurvatureSum, ShiftedCurvature


def _identity_multiple(op: Any) -> Any:
    """Return ``λ`` of ``λ I`` given as ``Identity``, ``ScalarMul`` or ``ScalarMul · Identity``."""
    if isinstance(op, Identity):
        return 1.0
    if isinstance(op, ScalarMul):
        return op.c
    return op.Ms[0].c


#: ``λ I`` as CoLA builds it: ``I_like(A)``, ``λ * I_like(A)`` or ``ScalarMul(λ)``.
IdentityMultiple = Identity | ScalarMul | Product[ScalarMul, Identity]
#: Operators that own their damping: ``.damped(λ)`` keeps the structure exactly. Their
#: rules carry ``precedence=2``: a ``KroneckerFactored`` is also a ``BlockDiag``, and plum
#: cannot order this union against the user-built ``Kronecker | BlockDiag`` rule below.
SelfDamping = KroneckerFactored | DiagonalPlusLowRank | ShiftedCurvature | CurvatureSum


# (Q_G⊗Q_A) S (Q_G⊗Q_A)ᵀ + λI = (Q_G⊗Q_A)(S + λ)(Q_G⊗Q_A)ᵀ,
# (diag(d) + U M Uᵀ) + λI = diag(d + λ) + U M Uᵀ,  (c A + λI) + μI = c A + (λ + μ)I
@dispatch(precedence=2)
def add(A: SelfDamping, B: IdentityMultiple):
    """Return ``A + λ I`` in ``A``'s own structure (Kronecker: exact eigen-damping)."""
    return A.damped(_identity_multiple(B))


# λI + A = A + λI
@dispatch(precedence=2)
def add(A: IdentityMultiple, B: SelfDamping):  # noqa: F811
    """Return ``λ I + A`` in ``A``'s own structure."""
    return B.damped(_identity_multiple(A))


def _damped(block: Any, damping: Any) -> Any:
    """Return ``block + λI`` by the rules above (``λ`` may be a differentiable scalar)."""
    if isinstance(block, SelfDamping):
        return block.damped(damping)
    if isinstance(block, CurvatureOperator):
        return ShiftedCurvature(block, damping)
    return block + damping * Identity(block.shape, block.dtype)


def _damped_or_sum(structured_source: Any, other: Any, identity_multiple: Any) -> Any:
    """Return the user-built operator damped in structured form, else CoLA's ``Sum``.

    ``BlockDiag(B_1, …) + λI = BlockDiag(B_1 + λI, …)``: each block is damped by its own
    rules (a matrix-free block stays matrix-free), when no Kronecker form exists.
    """
    damping = _identity_multiple(identity_multiple)
    structured = as_kronecker_factored(structured_source)
    if structured is not None:
        return structured.damped(damping, mode="exact")
    if isinstance(structured_source, BlockDiag):
        blocks = [_damped(block, damping) for block in structured_source.Ms]
        return BlockDiag(*blocks, multiplicities=structured_source.multiplicities)
    return Sum(structured_source, other)


# Kronecker(G, A) + λI = (Q_G⊗Q_A)(Λ_G ⊗ Λ_A + λ)(Q_G⊗Q_A)ᵀ, for symmetric dense G, A
@dispatch(precedence=1)
def add(A: Kronecker | BlockDiag, B: IdentityMultiple):  # noqa: F811
    """Return a user-built Kronecker / block-diagonal operator plus ``λ I``, structured if can."""
    return _damped_or_sum(A, B, B)


# λI + Kronecker(G, A) = Kronecker(G, A) + λI
@dispatch(precedence=1)
def add(A: IdentityMultiple, B: Kronecker | BlockDiag):  # noqa: F811
    """Return ``λ I`` plus a user-built Kronecker / block-diagonal operator."""
    return _damped_or_sum(B, A, A)


# A + λI, for A known only through its products
@dispatch(precedence=1)
def add(A: CurvatureOperator, B: IdentityMultiple):  # noqa: F811
    """Return ``A + λ I`` as a :class:`ShiftedCurvature`."""
    return ShiftedCurvature(A, _identity_multiple(B))


# λI + A = A + λI
@dispatch(precedence=1)
def add(A: IdentityMultiple, B: CurvatureOperator):  # noqa: F811
    """Return ``λ I + A`` as a :class:`ShiftedCurvature`."""
    return ShiftedCurvature(B, _identity_multiple(A))


# (Σ_i a_i A_i + λI) + (Σ_j b_j B_j + μI) = Σ_i a_i A_i + Σ_j b_j B_j + (λ + μ) I
@dispatch(precedence=1)
def add(A: ParameterSpaceInterface, B: ParameterSpaceInterface):  # noqa: F811
    """Return the sum of two curvature operators over the same parameters, matrix-free."""
    return CurvatureSum.of(A, B)
