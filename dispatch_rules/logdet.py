"""Log-determinants: exact for Kronecker factors and ``cI``, by SLQ for matrix-free operators."""

from __future__ import annotations

from cola.linalg import Algorithm, Auto
from cola.ops import ScalarMul
from plum import dispatch

from cola_curvature.algorithms import SLQ
from cola_curvature.estimators import slq_slogdet
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import MatrixFreeCurvature
from dispatch_rules._spectrum import zero_cutoff


# log|det K| = Σ_l Σ_ij log|S_l,ij|,  sign(det K) = Π sign(S_l,ij)
@dispatch(precedence=1)
def slogdet(A: KroneckerFactored, log_alg: Algorithm, trace_alg: Algorithm):
    """Return ``(sign, log|det K|)`` exactly; the algorithms are not used.

    A singular ``K`` (an eigenvalue ``|λ| ≤ 10 · ε · max|λ|``, rounding noise of a zero, as
    an undamped KFAC of a rank-deficient factor has) gives ``(0, −inf)``, as
    ``numpy.linalg.slogdet`` does, never a finite number from the noise.
    """
    xnp = A.xnp
    eigenvalues = A.eigenvalues()
    singular = (xnp.abs(eigenvalues) <= zero_cutoff(eigenvalues, xnp)).any()
    negatives = (eigenvalues < 0).sum()
    sign = 1 - 2 * (negatives % 2)
    log_abs = xnp.log(xnp.abs(eigenvalues)).sum()
    return xnp.where(singular, 0 * sign, sign), xnp.where(singular, -float("inf"), log_abs)


# det(c I_D) = c^D: log|det| = D log|c|, sign = sign(c)^D  (CoLA 0.0.7 returns log|c|)
@dispatch(precedence=1)
def slogdet(A: ScalarMul, log_alg: Algorithm, trace_alg: Algorithm):  # noqa: F811
    """Return ``(sign(c)^D, D log|c|)`` for ``c I`` of size ``D``."""
    xnp = A.xnp
    c = A.c if xnp.is_array(A.c) else xnp.array(A.c, dtype=A.dtype, device=A.device)
    dimension = A.shape[0]
    return (c / xnp.abs(c)) ** (dimension % 2), dimension * xnp.log(xnp.abs(c))


# log|det A| = tr log|A| by stochastic Lanczos quadrature
@dispatch(precedence=1)
def slogdet(A: MatrixFreeCurvature, log_alg: Auto | SLQ, trace_alg: Algorithm):  # noqa: F811
    """Return ``(sign, log|det A|)`` by SLQ; ``Auto`` means ``SLQ()``.

    Never densifies (CoLA's ``Auto`` would run a Cholesky of the matrix for ``D ≤ 1000``).
    The sign is exact (``+1``) for ``PSD`` operators such as ``GGN + λI`` and estimated
    otherwise; see :func:`~cola_curvature.estimators.slq_slogdet`.
    """
    return slq_slogdet(A, SLQ() if isinstance(log_alg, Auto) else log_alg)


# det(diag(d) + U M Uᵀ) = Π d_i · det(I_k + M Uᵀ diag(d)⁻¹ U)  (Sylvester)
@dispatch(precedence=1)
def slogdet(A: DiagonalPlusLowRank, log_alg: Algorithm, trace_alg: Algorithm):  # noqa: F811
    """Return ``(sign, log|det|)`` exactly from a ``k × k`` determinant."""
    return A.slogdet()
