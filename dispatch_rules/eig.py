"""Eigen-decompositions: exact for Kronecker factors, Lanczos for matrix-free operators."""

from __future__ import annotations

from cola.linalg import Algorithm, Auto
from cola.ops import Dense
from plum import dispatch

from cola_curvature.algorithms import LanczosEig
from cola_curvature.matfree.krylov import check_which, lanczos_eigenpairs, select
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
def eig(A: MatrixFreeCurvature | DiagonalPlusLowRank, k: int, which: str, alg: Auto | LanczosEig):  # noqa: F811
    """Return ``k`` eigenvalues ordered by ``which`` and their eigenvectors (``Dense (D, k)``).

    Lanczos with full reorthogonalisation and restarts on breakdown
    (:func:`~cola_curvature.matfree.krylov.lanczos_eigenpairs`); ``Auto`` means
    ``LanczosEig()``. Extreme eigenvalues (``"LA"``, ``"SA"``, and ``"LM"``) converge
    first; ``"SM"`` of an indefinite operator is interior and may need ``max_iters ≈ D``.
    """
    lanczos = LanczosEig() if isinstance(alg, Auto) else alg
    values, vectors = lanczos_eigenpairs(
        A,
        k,
        which,
        tol=lanczos.tol,
        max_iters=lanczos.max_iters,
        seed=lanczos.seed,
        on_failure=lanczos.on_failure,
    )
    return values, Dense(vectors)
