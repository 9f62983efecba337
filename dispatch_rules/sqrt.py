"""sqrt, inverse sqrt and every other spectral function of Kronecker-factored operators."""

from __future__ import annotations

from collections.abc import Callable

from cola.linalg import Algorithm
from plum import dispatch

from cola_curvature.operators.kronecker import KroneckerFactored


# f(P ⊕_l (Q_G⊗Q_A) S_l (Q_G⊗Q_A)ᵀ Pᵀ) = P ⊕_l (Q_G⊗Q_A) f(S_l) (Q_G⊗Q_A)ᵀ Pᵀ
@dispatch(precedence=1)
def apply_unary(f: Callable, A: KroneckerFactored, alg: Algorithm):
    """Return ``f(K)`` exactly in Kronecker-factored form; ``alg`` is not used."""
    return A.map_spectrum(f)
