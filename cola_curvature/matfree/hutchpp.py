"""Hutch++ (Meyer, Musco, Musco & Woodruff 2021): exact trace on a sketch, Hutchinson after."""

from __future__ import annotations

from dataclasses import dataclass

from cola.ops import LinearOperator

from cola_curvature.matfree._arguments import check_budget, check_square
from cola_curvature.matfree._random import rademacher
from cola_curvature.matfree.interface import TraceEstimator
from cola_curvature.types import Array


@dataclass(frozen=True)
class HutchPlusPlus(TraceEstimator):
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched range, Hutchinson on the rest.

    ``m/3`` columns sketch ``Q = orth(A S)``; ``tr A ≈ tr(Qᵀ A Q) + Hutchinson of
    (I − QQᵀ) A (I − QQᵀ)`` with the remaining columns. Unbiased; exact when
    ``rank A ≤ m/3``; error ``O(‖A‖_* / m)`` for PSD ``A``. Needs ``m ≥ 3``.
    """

    num_matvecs: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        check_budget("Hutch++", self.num_matvecs, 3)

    def trace(self, A: LinearOperator) -> Array:
        """Return ``tr(QᵀAQ) + (1/g) Σ_j g̃_jᵀ A g̃_j`` with ``g̃ = (I − QQᵀ) g``.

        ``Q = orth(A S)`` for ``s = ⌊m/3⌋`` Rademacher columns ``S`` (at most ``D``), and
        ``g = m − 2s`` Rademacher probes ``G`` of the complement. Products: ``A S``,
        ``A Q``, ``A G̃``. Exact when ``rank A ≤ s``.
        """
        check_square(A)
        xnp = A.xnp
        sketch_size = min(self.num_matvecs // 3, A.shape[0])
        probes = self.num_matvecs - 2 * sketch_size
        S = rademacher(A, sketch_size + probes, self.seed)
        G, S = S[:, sketch_size:], S[:, :sketch_size]
        Q, _ = xnp.qr(A @ S, full_matrices=False)
        estimate = xnp.sum(Q * (A @ Q), axis=(0, 1))
        if probes == 0:
            return estimate
        G = G - Q @ (Q.T @ G)
        return estimate + xnp.sum(G * (A @ G), axis=(0, 1)) / probes
