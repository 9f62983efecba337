"""sqrt, isqrt and every spectral function: exact for Kronecker factors, else by Lanczos."""

from __future__ import annotations

from collections.abc import Callable

from cola.linalg import Algorithm, Auto, Lanczos
from plum import dispatch

from cola_curvature.algorithms import LanczosFunction
from cola_curvature.matfree.functions import MatrixFunction
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import CurvatureFunction, MatrixFreeCurvature


# f(P ⊕_l (Q_G⊗Q_A) S_l (Q_G⊗Q_A)ᵀ Pᵀ) = P ⊕_l (Q_G⊗Q_A) f(S_l) (Q_G⊗Q_A)ᵀ Pᵀ
@dispatch(precedence=1)
def apply_unary(f: Callable, A: KroneckerFactored, alg: Algorithm):
    """Return ``f(K)`` exactly in Kronecker-factored form; ``alg`` is not used."""
    return A.map_spectrum(f)


# f(A) v ≈ ‖v‖ Q_s f(T_s) e₁, s Lanczos steps from v (A known by its products)
@dispatch(precedence=1)
def apply_unary(  # noqa: F811
    f: Callable, A: MatrixFreeCurvature | DiagonalPlusLowRank, alg: Auto | LanczosFunction | Lanczos
):
    """Return ``f(A)`` as an operator whose ``@`` runs Lanczos, never a dense ``eigh``.

    ``Auto`` means ``cc.LanczosFunction()``; CoLA's ``Lanczos(tol, max_iters)`` sets the same
    knobs. ``cola.linalg.Eigh()`` still decomposes the dense matrix when asked for.
    """
    if isinstance(alg, Auto):
        alg = LanczosFunction()
    elif isinstance(alg, Lanczos):
        alg = LanczosFunction(tol=alg.tol, max_iters=alg.max_iters)
    if isinstance(A, DiagonalPlusLowRank):
        return MatrixFunction(A, f, alg)
    return CurvatureFunction(A, f, alg)
