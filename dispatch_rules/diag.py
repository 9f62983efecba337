"""Diagonals: exact for Kronecker factors, randomized estimators for matrix-free operators."""

from __future__ import annotations

from cola.linalg import Algorithm, Auto
from plum import dispatch

from cola_curvature.matfree import DiagonalEstimator, XDiag
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import CurvatureSum, ShiftedCurvature


def _main_diagonal_only(A: object, k: int) -> None:
    """Raise ``NotImplementedError`` for off-diagonals (``k != 0``)."""
    if k != 0:
        raise NotImplementedError(
            f"diag(k={k}) of a {type(A).__name__} is not implemented; only k=0 is."
        )


# diag(P ⊕_l B_l Pᵀ) = P (⊕_l diag B_l),  diag(G⊗A) = diag G ⊗ diag A,
# diag(diag(d) + U M Uᵀ) = d + rowsum((U M) ⊙ U)
@dispatch(precedence=1)
def diag(A: KroneckerFactored | DiagonalPlusLowRank, k: int, alg: Algorithm):
    """Return the main diagonal exactly (``k`` must be 0)."""
    _main_diagonal_only(A, k)
    return A.diagonal()


# diag A ≈ randomized estimate from products A Ω with many columns
@dispatch(precedence=1)
def diag(A: CurvatureOperator, k: int, alg: Auto | DiagonalEstimator):  # noqa: F811
    """Return ``alg.diagonal(A)``, an estimate of ``diag A``; ``Auto`` means ``XDiag(200)``.

    Any :class:`~cola_curvature.matfree.DiagonalEstimator` serves (``cc.Hutchinson``,
    ``cc.XDiag``, or a new subclass).

    ``benchmarks/RESULTS.md``: with 60 products either XDiag or Hutchinson is 25–30 % off
    on a small MLP's GGN; 200 products give about 6 % (and the exact diagonal when the
    rank is below 100).

    ``cola.linalg.Exact()`` still gives the exact diagonal from ``D`` unit vectors; for a
    cheap exact diagonal of the GGN/Fisher use ``cc.DiagonalCurvature``.
    """
    _main_diagonal_only(A, k)
    return (XDiag(num_matvecs=200) if isinstance(alg, Auto) else alg).diagonal(A)


# diag(c A + λI) = c diag A + λ
@dispatch(precedence=1)
def diag(A: ShiftedCurvature, k: int, alg: Auto | DiagonalEstimator):  # noqa: F811
    """Return ``c`` times the estimate of ``diag A`` plus the exact ``λ``."""
    return A.scale * diag(A.base, k, alg) + A.shift


# diag(Σ_i c_i A_i + λI) = Σ_i c_i diag A_i + λ
@dispatch(precedence=1)
def diag(A: CurvatureSum, k: int, alg: Auto | DiagonalEstimator):  # noqa: F811
    """Return the terms' diagonals (exact for structured terms, else estimated) plus ``λ``."""
    _main_diagonal_only(A, k)
    total = A.shift
    for c, term in A.terms:
        total = total + c * diag(term, k, alg)
    return total
