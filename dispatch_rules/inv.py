"""Inverses: exact from Kronecker eigen-decompositions, iterative for matrix-free operators."""

from __future__ import annotations

from cola.annotations import PSD
from cola.linalg import CG as ColaCG
from cola.linalg import Algorithm, Auto
from cola.ops import LinearOperator
from plum import dispatch

from cola_curvature.matfree import CG, MINRES, LinearSolver
from cola_curvature.matfree.solvers import IterativeInverse
from cola_curvature.operators._interface import ParameterSpaceInterface
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import MatrixFreeCurvature
from dispatch_rules._spectrum import zero_cutoff


class CurvatureInverse(ParameterSpaceInterface, IterativeInverse):
    """:class:`~cola_curvature.matfree.solvers.IterativeInverse` of a curvature operator.

    Accepts the same input formats as the operator (``(D,)``, ``(D, k)``, parameter-shaped).
    """

    def __init__(self, A: MatrixFreeCurvature, alg: LinearSolver) -> None:
        self._backend = A._backend
        super().__init__(A, alg)


# (P ⊕_l (Q_G⊗Q_A) S_l (Q_G⊗Q_A)ᵀ Pᵀ)⁻¹ = P ⊕_l (Q_G⊗Q_A) S_l⁻¹ (Q_G⊗Q_A)ᵀ Pᵀ; (G⊗A)⁻¹ = G⁻¹⊗A⁻¹
@dispatch(precedence=1)
def inv(A: KroneckerFactored, alg: Algorithm):
    """Return ``K⁻¹``, exact and Kronecker-factored; ``alg`` is not used.

    Blocks that hold both factors (undamped or heuristically damped KFAC) invert as
    ``G⁻¹ ⊗ A⁻¹`` (two products per column); eigen-form blocks (exact damping, EKFAC) as
    ``(Q_G⊗Q_A) S⁻¹ (Q_G⊗Q_A)ᵀ`` (four).

    Raises:
        ValueError: when ``K`` is singular, an eigenvalue ``≤ 10 · ε · max|λ|`` (rounding noise
            of a zero; damp it first: ``K + λ * cola.ops.I_like(K)``), or indefinite.
    """
    eigenvalues = A.eigenvalues()
    if not bool((eigenvalues > zero_cutoff(eigenvalues, A.xnp)).all()):
        raise ValueError(
            "This Kronecker-factored operator is singular or indefinite (an eigenvalue is "
            "zero up to rounding, |λ| <= 10·ε·max|λ|, or negative); invert a damped version, "
            "e.g. cola.linalg.inv(K + λ * cola.ops.I_like(K))."
        )
    return A.inverse()


# (P ⊕_l (Q_G⊗Q_A) S_l (Q_G⊗Q_A)ᵀ Pᵀ)⁺ = P ⊕_l (Q_G⊗Q_A) S_l⁺ (Q_G⊗Q_A)ᵀ Pᵀ
@dispatch(precedence=1)
def pinv(A: KroneckerFactored, alg: Algorithm):
    """Return the Moore-Penrose pseudo-inverse, zeroing eigenvalues ``≤ 10 · ε · max|s|``."""
    xnp = A.xnp
    eigenvalues = A.eigenvalues()
    cutoff = zero_cutoff(eigenvalues, xnp)

    def pseudo_reciprocal(s):
        keep = xnp.abs(s) > cutoff
        return xnp.where(keep, 1 / xnp.where(keep, s, 1 + 0 * s), 0 * s)

    return A.map_spectrum(pseudo_reciprocal)


# A⁻¹ B by CG (PSD A) or MINRES (symmetric indefinite A), one product per iteration
@dispatch(precedence=1)
def inv(A: MatrixFreeCurvature, alg: Auto):  # noqa: F811
    """Return ``A⁻¹`` as an operator solving by CG when ``A`` is ``PSD``, else MINRES.

    Defaults: ``tol=1e-10`` (relative residual), ``max_iters=1000``, a
    :class:`~cola_curvature.ConvergenceWarning` when a column stops short. Choose other
    knobs with ``alg=cc.CG(...)``, ``cc.MINRES(...)`` or ``cc.Neumann(...)``.
    """
    return CurvatureInverse(A, CG() if A.isa(PSD) else MINRES())


@dispatch(precedence=1)
def inv(A: MatrixFreeCurvature, alg: LinearSolver):  # noqa: F811
    """Return ``A⁻¹`` as an operator whose ``@`` runs ``alg.solve`` on all columns together.

    Any :class:`~cola_curvature.matfree.LinearSolver` serves (``cc.CG``, ``cc.MINRES``,
    ``cc.Neumann``, or a new subclass).
    """
    return CurvatureInverse(A, alg)


@dispatch(precedence=1)
def inv(A: MatrixFreeCurvature, alg: ColaCG):  # noqa: F811
    """Return ``A⁻¹`` solving by our batched CG with CoLA's ``CG(tol, max_iters)`` knobs.

    CoLA's own CG stops at ``‖r‖ ≤ tol (‖r₀‖ + 1)`` and does not report failure.
    """
    return CurvatureInverse(A, CG(tol=alg.tol, max_iters=alg.max_iters))


# (diag(d) + U M Uᵀ)⁻¹ = diag(1/d) − (U/d) M (I + Uᵀ(U/d) M)⁻¹ (U/d)ᵀ  (Woodbury)
@dispatch(precedence=1)
def inv(A: DiagonalPlusLowRank, alg: Algorithm):  # noqa: F811
    """Return the exact inverse, again a diagonal plus a rank-``k`` term; ``alg`` is not used."""
    return A.inverse()


# A⁻¹ B by our solvers on any other symmetric CoLA operator (a Sum of two KFACs, ...)
@dispatch(precedence=-1)
def inv(A: LinearOperator, alg: LinearSolver):  # noqa: F811
    """Return ``A⁻¹`` as an operator whose ``@`` runs ``alg.solve`` (``A`` must be symmetric).

    Structured operators CoLA inverts exactly (identity, diagonal, block-diagonal, ...)
    keep their exact rules; these come first.
    """
    return IterativeInverse(A, alg)
