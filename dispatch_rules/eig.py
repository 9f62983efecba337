"""Exact eigen-decompositions of Kronecker-factored operators."""

from __future__ import annotations

from cola.linalg import Algorithm
from cola.ops import Dense
from plum import dispatch

from cola_curvature.operators.kronecker import KroneckerFactored

_ORDERS = ("LM", "SM", "LA", "SA")


# eig(P ⊕_l (Q_G⊗Q_A) S_l (Q_G⊗Q_A)ᵀ Pᵀ): values S_l,ij, vectors P (q_G,i ⊗ q_A,j)
@dispatch(precedence=1)
def eig(A: KroneckerFactored, k: int, which: str, alg: Algorithm):
    """Return the ``k`` eigenvalues selected by ``which`` and their eigenvectors, exactly.

    ``which``: ``"LM"``/``"SM"`` (largest/smallest magnitude), ``"LA"``/``"SA"`` (largest/
    smallest algebraic). Eigenvectors come back as a ``Dense`` ``(D, k)`` operator.
    """
    if which not in _ORDERS:
        raise ValueError(f"which must be one of {_ORDERS}, got {which!r}.")
    if not 0 < k <= A.shape[0]:
        raise ValueError(f"k must be in 1..{A.shape[0]}, got {k}.")
    xnp = A.xnp
    eigenvalues = A.eigenvalues()
    key = xnp.abs(eigenvalues) if which in ("LM", "SM") else eigenvalues
    order = xnp.argsort(-key if which in ("LM", "LA") else key)
    selected = [int(i) for i in order[:k]]
    return eigenvalues[order[:k]], Dense(A.eigenvectors(selected))
