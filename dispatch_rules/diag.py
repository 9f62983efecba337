"""Exact diagonals of Kronecker-factored operators."""

from __future__ import annotations

from cola.linalg import Algorithm
from plum import dispatch

from cola_curvature.operators.kronecker import KroneckerFactored


# diag(P ⊕_l B_l Pᵀ) = P (⊕_l diag B_l),  diag(G⊗A) = diag G ⊗ diag A
@dispatch(precedence=1)
def diag(A: KroneckerFactored, k: int, alg: Algorithm):
    """Return the main diagonal exactly (``k`` must be 0)."""
    if k != 0:
        raise NotImplementedError(
            f"diag(k={k}) of a {type(A).__name__} is not implemented; only k=0 is."
        )
    return A.diagonal()
