"""Exact log-determinants of Kronecker-factored operators from their eigenvalues."""

from __future__ import annotations

from cola.linalg import Algorithm
from plum import dispatch

from cola_curvature.operators.kronecker import KroneckerFactored


# log|det K| = Σ_l Σ_ij log|S_l,ij|,  sign(det K) = Π sign(S_l,ij)
@dispatch(precedence=1)
def slogdet(A: KroneckerFactored, log_alg: Algorithm, trace_alg: Algorithm):
    """Return ``(sign, log|det K|)`` exactly; the algorithms are not used."""
    xnp = A.xnp
    eigenvalues = A.eigenvalues()
    negatives = (eigenvalues < 0).sum()
    sign = 1 - 2 * (negatives % 2)
    sign = xnp.where(xnp.all(eigenvalues != 0), sign, 0 * sign)
    return sign, xnp.log(xnp.abs(eigenvalues)).sum()
