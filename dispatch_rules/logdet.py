"""Log-determinants: exact for Kronecker factors and ``cI``, by quadrature if matrix-free."""

from __future__ import annotations

from dataclasses import dataclass, replace

from cola.linalg import Algorithm, Auto, Eigh
from cola.ops import LinearOperator, ScalarMul
from plum import dispatch

from cola_curvature._tracing import is_traced
from cola_curvature.matfree import SLQ, LogdetEstimator, SpectralQuadrature
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import MatrixFreeCurvature, ShiftedCurvature
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


# log|det A| = tr log|A|, estimated by the algorithm (SLQ: stochastic Lanczos quadrature)
@dispatch(precedence=1)
def slogdet(A: MatrixFreeCurvature, log_alg: Auto | LogdetEstimator, trace_alg: Algorithm):  # noqa: F811
    """Return ``log_alg.slogdet(A)``; ``Auto`` means ``SLQ()``.

    Never densifies (CoLA's ``Auto`` would run a Cholesky of the matrix for ``D ≤ 1000``).
    With SLQ the sign is exact (``+1``) for ``PSD`` operators such as ``GGN + λI`` and
    estimated otherwise; see :meth:`~cola_curvature.SLQ.slogdet`.
    """
    return (SLQ() if isinstance(log_alg, Auto) else log_alg).slogdet(A)


# log|det(c A + δ I)| = Σ τ_i² log|c θ_i + δ| over the rule (θ_i, τ_i²) of A, kept on A
@dispatch(precedence=1)
def slogdet(A: ShiftedCurvature, log_alg: Auto | SLQ, trace_alg: Algorithm):  # noqa: F811
    """Return ``(sign, log|det(c A + δ I)|)`` from the quadrature rule of ``A``, kept on ``A``.

    ``SLQ`` (``Auto`` means ``SLQ()``): Lanczos quadrature; ``cola.linalg.Eigh()`` (the rule
    below): the exact rule. The rule of ``c A + δ I`` is that of ``A`` with nodes
    ``c θ + δ`` (Krylov spaces do not change under scaling and shifts), so only the first
    call for ``A`` costs products; every later ``(c, δ)`` costs none, and the result is
    differentiable in ``c`` and ``δ``. The sign is that of :meth:`~cola_curvature.SLQ.slogdet`
    on the rule.
    """
    return _KnownRule(rule=shifted_quadrature(A, log_alg)).slogdet(A)


# the same with A's exact rule: all its eigenvalues, each of weight 1/D
@dispatch(precedence=1)
def slogdet(A: ShiftedCurvature, log_alg: Eigh, trace_alg: Algorithm):  # noqa: F811
    """Return ``(sign, log|det(c A + δ I)|)`` exactly from ``A``'s eigenvalues, kept on ``A``.

    The first call for ``A`` costs ``D`` products and a dense ``eigh`` (``O(D²)`` memory).
    """
    return _KnownRule(rule=shifted_quadrature(A, log_alg)).slogdet(A)


# det(diag(d) + U M Uᵀ) = Π d_i · det(I_k + M Uᵀ diag(d)⁻¹ U)  (Sylvester)
@dispatch(precedence=1)
def slogdet(A: DiagonalPlusLowRank, log_alg: Algorithm, trace_alg: Algorithm):  # noqa: F811
    """Return ``(sign, log|det|)`` exactly from a ``k × k`` determinant."""
    return A.slogdet()


def spectral_quadrature(A: LinearOperator, alg: Auto | SLQ | Eigh) -> SpectralQuadrature:
    """Return the quadrature rule of ``A`` for ``alg``, computed once and kept on ``A``.

    ``Eigh`` gives the exact rule, ``SLQ`` (``Auto``: ``SLQ()``) its Lanczos rules; ``A``'s
    products never change, so the rule is valid for the operator's lifetime. A rule of
    traced values (computed inside ``jax.jit``) is returned but not kept.
    """
    alg = SLQ() if isinstance(alg, Auto) else alg
    key = "exact" if isinstance(alg, Eigh) else alg
    kept = getattr(A, "_quadratures", None)
    if kept is None:
        A._quadratures = kept = {}
    if key not in kept:
        rule = SpectralQuadrature.exact(A) if key == "exact" else alg.quadrature(A)
        if is_traced(rule.nodes):
            return rule
        kept[key] = rule
    return kept[key]


def shifted_quadrature(A: ShiftedCurvature, alg: Auto | SLQ | Eigh) -> SpectralQuadrature:
    """Return the rule of ``c A + δ I``: the kept rule of ``A`` with nodes ``c θ + δ``."""
    rule = spectral_quadrature(A.base, alg)
    return replace(rule, nodes=A.scale * rule.nodes + A.shift)


@dataclass(frozen=True)
class _KnownRule(SLQ):
    """SLQ whose quadrature rule is already known: its ``slogdet`` runs no Lanczos."""

    rule: SpectralQuadrature | None = None

    def quadrature(self, A: LinearOperator) -> SpectralQuadrature:
        """Return the known rule."""
        return self.rule
