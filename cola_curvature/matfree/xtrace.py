"""XTrace and XDiag (Epperly, Tropp & Webber 2024): Hutch++ and Diag++ made exchangeable."""

from __future__ import annotations

from dataclasses import dataclass

from cola.ops import LinearOperator

from cola_curvature.matfree._arguments import check_budget, check_square
from cola_curvature.matfree._random import rademacher
from cola_curvature.matfree.interface import DiagonalEstimator, TraceEstimator
from cola_curvature.types import Array


@dataclass(frozen=True)
class _ExchangeableSketch:
    """The shared quantities of XTrace and XDiag for ``k`` test vectors ``Ω``.

    ``Y = A Ω = Q R``; ``s_i`` is the normalised ``i``-th column of ``R⁻ᵀ``, so that the
    projector onto the sketch without ``ω_i`` is ``Q_i Q_iᵀ = Q (I − s_i s_iᵀ) Qᵀ``;
    ``Z = A Q``.
    """

    omega: Array
    Y: Array
    Q: Array
    R: Array
    S: Array
    Z: Array


@dataclass(frozen=True)
class XTrace(TraceEstimator, DiagonalEstimator):
    """XTrace / XDiag (Epperly, Tropp & Webber 2024): Hutch++ made exchangeable.

    ``k = m/2`` test vectors ``ω_i`` sketch ``Q = orth(A Ω)``; each ``ω_i`` in turn is
    left out of the sketch and used as the Hutchinson probe of the complement, and the
    ``k`` estimates are averaged. Unbiased; exact when ``rank A < m/2`` or ``m/2 ≥ D``
    (then ``Q`` spans everything). Needs ``m ≥ 4``.
    """

    num_matvecs: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        check_budget("XTrace/XDiag", self.num_matvecs, 4)

    def _sketch(self, A: LinearOperator) -> _ExchangeableSketch:
        """Return the sketch of ``k = min(⌊m/2⌋, D)`` Rademacher test vectors."""
        check_square(A)
        xnp = A.xnp
        num_vectors = min(self.num_matvecs // 2, A.shape[0])
        omega = rademacher(A, num_vectors, self.seed)
        Y = A @ omega
        Q, R = xnp.qr(Y, full_matrices=False)
        R_inverse_t = xnp.inv(R).T
        S = R_inverse_t / xnp.norm(R_inverse_t, axis=0, keepdims=True)
        return _ExchangeableSketch(omega, Y, Q, R, S, A @ Q)

    def trace(self, A: LinearOperator) -> Array:
        """Return the XTrace estimate: the mean over ``i`` of Hutch++ with ``ω_i`` left out.

        Estimate ``i``: ``tr(Q_iᵀ A Q_i) + ω̃_iᵀ A ω̃_i`` with ``ω̃_i = (I − Q_iQ_iᵀ) ω_i``.
        With ``H = QᵀAQ``, ``c_i = Qᵀω_i`` and ``d_i = c_i − (s_iᵀc_i) s_i``:
        ``tr(Q_iᵀAQ_i) = tr H − s_iᵀHs_i`` and, ``A`` being symmetric,
        ``ω̃_iᵀAω̃_i = ω_iᵀy_i − 2 r_iᵀd_i + d_iᵀHd_i`` (``y_i = Aω_i``, ``r_i = Qᵀy_i``
        the ``i``-th column of ``R``). Products: ``A Ω`` and ``A Q``, ``k`` columns each.
        """
        xnp = A.xnp
        sketch = self._sketch(A)
        Q, R, S = sketch.Q, sketch.R, sketch.S
        H = Q.T @ sketch.Z
        if Q.shape[1] == A.shape[0]:  # the sketch spans R^D: tr A = tr(QᵀAQ) exactly
            return xnp.sum(xnp.diag(H), axis=0)
        C = Q.T @ sketch.omega
        D = C - S * xnp.sum(S * C, axis=0, keepdims=True)
        estimates = (
            xnp.sum(xnp.diag(H), axis=0)
            - xnp.sum(S * (H @ S), axis=0)
            + xnp.sum(sketch.omega * sketch.Y, axis=0)
            - 2 * xnp.sum(R * D, axis=0)
            + xnp.sum(D * (H @ D), axis=0)
        )
        return xnp.mean(estimates)

    def diagonal(self, A: LinearOperator) -> Array:
        """Return the XDiag estimate: the mean over ``i`` of Diag++ with ``ω_i`` left out.

        Estimate ``i``: ``diag(Q_iQ_iᵀA) + ω_i ⊙ (I − Q_iQ_iᵀ) A ω_i`` (Rademacher, so
        ``ω_i ⊙ ω_i = 1``). Averaged over ``i`` with ``Q_iQ_iᵀ = Q(I − s_is_iᵀ)Qᵀ`` and
        ``QᵀA = Zᵀ``: ``rowsum(Q ⊙ Z) − (1/k) rowsum(QS ⊙ ZS) + (1/k) rowsum(Ω ⊙ (Y −
        Q(R − S diag(SᵀR))))``. Products: ``A Ω`` and ``A Q``.
        """
        xnp = A.xnp
        sketch = self._sketch(A)
        Q, R, S = sketch.Q, sketch.R, sketch.S
        num_vectors = S.shape[1]
        if num_vectors == A.shape[0]:  # the sketch spans R^D: diag A = diag(QQᵀA) exactly
            return xnp.sum(Q * sketch.Z, axis=1)
        deflated = R - S * xnp.sum(S * R, axis=0, keepdims=True)
        complement = sketch.Y - Q @ deflated
        return (
            xnp.sum(Q * sketch.Z, axis=1)
            - xnp.sum((Q @ S) * (sketch.Z @ S), axis=1) / num_vectors
            + xnp.sum(sketch.omega * complement, axis=1) / num_vectors
        )


#: XDiag is XTrace's exchangeable construction applied to the diagonal.
XDiag = XTrace
