"""Exact inverses of Kronecker-factored operators from their eigen-decompositions."""

from __future__ import annotations

from cola.linalg import Algorithm
from plum import dispatch

from cola_curvature.operators.kronecker import KroneckerFactored


# (P ⊕_l (Q_G⊗Q_A) S_l (Q_G⊗Q_A)ᵀ Pᵀ)⁻¹ = P ⊕_l (Q_G⊗Q_A) S_l⁻¹ (Q_G⊗Q_A)ᵀ Pᵀ
@dispatch(precedence=1)
def inv(A: KroneckerFactored, alg: Algorithm):
    """Return ``K⁻¹``, exact and Kronecker-factored; ``alg`` is not used.

    Raises:
        ValueError: when ``K`` is singular (damp it first: ``K + λ * cola.ops.I_like(K)``).
    """
    if not bool((A.eigenvalues() > 0).all()):
        raise ValueError(
            "This Kronecker-factored operator is singular or indefinite (an eigenvalue is "
            "<= 0); invert a damped version, e.g. cola.linalg.inv(K + λ * cola.ops.I_like(K))."
        )
    return A.map_spectrum(lambda s: 1 / s)


# (P ⊕_l (Q_G⊗Q_A) S_l (Q_G⊗Q_A)ᵀ Pᵀ)⁺ = P ⊕_l (Q_G⊗Q_A) S_l⁺ (Q_G⊗Q_A)ᵀ Pᵀ
@dispatch(precedence=1)
def pinv(A: KroneckerFactored, alg: Algorithm):
    """Return the Moore-Penrose pseudo-inverse, zeroing eigenvalues below ``D · ε · max|s|``."""
    xnp = A.xnp
    eigenvalues = A.eigenvalues()
    cutoff = A.shape[0] * xnp.finfo(A.dtype).eps * xnp.abs(eigenvalues).max()

    def pseudo_reciprocal(s):
        keep = xnp.abs(s) > cutoff
        return xnp.where(keep, 1 / xnp.where(keep, s, 1 + 0 * s), 0 * s)

    return A.map_spectrum(pseudo_reciprocal)
