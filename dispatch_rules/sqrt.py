"""sqrt, isqrt and every spectral function: exact where the structure allows, else Lanczos.

Exact for Kronecker factors and for a constant diagonal plus low rank; ``inverse_factor``
gives a factor ``L``, ``L Lᵀ = A⁻¹``, for sampling ``N(0, A⁻¹)``: ``A^{-1/2}``, or an
exact cheaper factor where one exists.
"""

from __future__ import annotations

from collections.abc import Callable

import cola
from cola.linalg import Algorithm, Auto, Lanczos
from cola.ops import LinearOperator
from plum import dispatch

from cola_curvature.matfree import LanczosFunction, MatrixFunctionMethod
from cola_curvature.matfree.functions import MatrixFunction
from cola_curvature.operators._interface import ParameterSpaceInterface
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import MatrixFreeCurvature
from cola_curvature.types import Array

#: The default algorithm: each rule chooses.
AUTO = Auto()


class CurvatureFunction(ParameterSpaceInterface, MatrixFunction):
    """:class:`~cola_curvature.matfree.functions.MatrixFunction` ``f(A)`` of a curvature operator.

    Accepts the same input formats as the operator (``(D,)``, ``(D, k)``, parameter-shaped).
    """

    def __init__(
        self, A: LinearOperator, f: Callable[[Array], Array], alg: MatrixFunctionMethod
    ) -> None:
        self._backend = A._backend
        super().__init__(A, f, alg)


# f(P ⊕_l (Q_G⊗Q_A) S_l (Q_G⊗Q_A)ᵀ Pᵀ) = P ⊕_l (Q_G⊗Q_A) f(S_l) (Q_G⊗Q_A)ᵀ Pᵀ
@dispatch(precedence=1)
def apply_unary(f: Callable, A: KroneckerFactored, alg: Algorithm):
    """Return ``f(K)`` exactly in Kronecker-factored form; ``alg`` is not used."""
    return A.map_spectrum(f)


# f(A) v ≈ ‖v‖ Q_s f(T_s) e₁, s Lanczos steps from v (A known by its products)
@dispatch(precedence=1)
def apply_unary(  # noqa: F811
    f: Callable, A: MatrixFreeCurvature, alg: Auto | MatrixFunctionMethod | Lanczos
):
    """Return ``f(A)`` as an operator whose ``@`` runs ``alg.apply``, never a dense ``eigh``.

    ``Auto`` means ``cc.LanczosFunction()``; CoLA's ``Lanczos(tol, max_iters)`` sets the same
    knobs; any :class:`~cola_curvature.matfree.MatrixFunctionMethod` serves.
    ``cola.linalg.Eigh()`` still decomposes the dense matrix when asked for.
    """
    return CurvatureFunction(A, f, _function_method(alg))


# f(c I + U M Uᵀ) = f(c) I + B (f(c (1 + Λ)) − f(c)) Bᵀ with U M Uᵀ = c B diag(Λ) Bᵀ, BᵀB = I
@dispatch(precedence=1)
def apply_unary(  # noqa: F811
    f: Callable, A: DiagonalPlusLowRank, alg: Auto | MatrixFunctionMethod | Lanczos
):
    """Return ``f(A)``: exact, ``O(D k²)``, for a constant diagonal; else as matrix-free.

    A diagonal that is not constant has no closed form of ``f(A)`` (``A^{-1/2}`` is then
    not a diagonal plus a low-rank term), so ``alg`` (``Auto``: ``cc.LanczosFunction()``)
    applies it. For samples of ``N(0, A⁻¹)`` the exact non-symmetric factor of
    :func:`inverse_factor` costs ``O(D k²)`` whatever the diagonal.
    """
    if A.has_constant_diagonal():
        return A.map_spectrum(f)
    return MatrixFunction(A, f, _function_method(alg))


# L Lᵀ = A⁻¹: A^{-1/2} itself, or a cheaper exact factor where the structure has one
@dispatch
def inverse_factor(A: LinearOperator, alg: Algorithm = AUTO) -> LinearOperator:
    """Return a factor ``L`` with ``L Lᵀ = A⁻¹`` (``A`` PD), so ``L z ~ N(0, A⁻¹)``.

    ``cola.linalg.isqrt(A, alg)``: the symmetric ``A^{-1/2}``, exact or by Lanczos as the
    rules for ``A`` decide.
    """
    return cola.linalg.isqrt(A, alg)


# diag(d) + U M Uᵀ = diag(√d) (I + B Λ Bᵀ) diag(√d)  ⇒  L = diag(d)^{-1/2} (I + B S Bᵀ)
@dispatch
def inverse_factor(A: DiagonalPlusLowRank, alg: Algorithm = AUTO) -> LinearOperator:  # noqa: F811
    """Return :meth:`DiagonalPlusLowRank.inverse_factor`, exact in ``O(D k²)``; not ``alg``.

    Symmetric (``A^{-1/2}``) only when the diagonal is constant.
    """
    return A.inverse_factor()


def _function_method(alg: Algorithm) -> MatrixFunctionMethod:
    """Return ``alg`` as a matrix-function method (``Auto``: ``LanczosFunction()``)."""
    if isinstance(alg, Auto):
        return LanczosFunction()
    if isinstance(alg, Lanczos):
        return LanczosFunction(tol=alg.tol, max_iters=alg.max_iters)
    return alg
