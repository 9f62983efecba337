"""Eigen-decompositions: exact for Kronecker factors, Lanczos for matrix-free operators."""

from __future__ import annotations

from cola.linalg import Algorithm, Auto
from cola.ops import Dense
from plum import dispatch

from cola_curvature.matfree import EigenSolver, LanczosEig
from cola_curvature.matfree.krylov import check_which, select
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import MatrixFreeCurvature


# eig(P ⊕_l (Q_G⊗Q_A) S_l (Q_G⊗Q_A)ᵀ Pᵀ): values S_l,ij, vectors P (q_G,i ⊗ q_A,j)
@dispatch(precedence=1)
def eig(A: KroneckerFactored, k: int, which: str, alg: Algorithm):
    """Return the ``k`` eigenvalues selected by ``which`` and their eigenvectors, exactly.

    ``which``: ``"LM"``/``"SM"`` (largest/smallest magnitude), ``"LA"``/``"SA"`` (largest/
    smallest algebraic). Eigenvectors come back as a ``Dense`` ``(D, k)`` operator.
    """
    check_which(A, k, which)
    eigenvalues = A.eigenvalues()
    selected = select(eigenvalues, k, which, A.xnp)
    return eigenvalues[selected], Dense(A.eigenvectors([int(i) for i in selected]))


# extreme eigenpairs of a symmetric operator known by its products: Lanczos, fully reorthogonalised
@dispatch(precedence=1)
def eig(A: MatrixFreeCurvature | DiagonalPlusLowRank, k: int, which: str, alg: Auto | EigenSolver):  # noqa: F811
    """Return ``k`` eigenvalues ordered by ``which`` and their eigenvectors (``Dense (D, k)``).

    ``alg.eigs(A, k, which)`` of any :class:`~cola_curvature.matfree.EigenSolver`; ``Auto``
    means ``LanczosEig()``: Lanczos with full reorthogonalisation and restarts on
    breakdown. Extreme eigenvalues (``"LA"``, ``"SA"``, and ``"LM"``) converge first;
    ``"SM"`` of an indefinite operator is interior and may need ``max_iters ≈ D``.
    """
    values, vectors = (LanczosEig() if isinstance(alg, Auto) else alg).eigs(A, k, which)
    return values, Dense(vectors)
