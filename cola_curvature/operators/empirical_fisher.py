"""The empirical Fisher as a matrix-free CoLA operator."""

from __future__ import annotations

from typing import Any

from cola.annotations import PSD

from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._output_space import EmpiricalFisherOutputMatmat
from cola_curvature.types import Array


class EmpiricalFisher(CurvatureOperator):
    r"""Empirical Fisher ``E = R Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ`` (Kunstner et al., 2019).

    ``ℓ_n`` is example ``n``'s loss (all its terms summed) and ``R`` the risk scaling
    (``1`` for ``"sum"``, ``1 / (N · T)`` for ``"mean"``). Since
    ``∇_θ ℓ_n = J_nᵀ d_n`` with ``d_n = ∇_f ℓ_n``, the product is a Gauss-Newton product
    with the rank-one output matrix ``d_n d_nᵀ``: ``E v = R Σ_n J_nᵀ d_n (d_nᵀ J_n v)``,
    without per-example gradients.

    Shapes: ``D`` parameter entries; ``E @ v`` takes ``(D,)``, ``(D, k)`` or a list of
    tensors shaped like ``params``.

    Cost per product and batch: as the GGN, about 1.5 gradients per column.
    Annotation: ``PSD``.

    Reference: Kunstner, Hennig, Balles, "Limitations of the empirical Fisher
    approximation for natural gradient descent", NeurIPS 2019, arXiv:1905.12558.
    """

    annotation = PSD
    compilable = True

    def _batch_matmat(self, columns: list[Array], batch: tuple[Any, Any], rng: Any) -> list[Array]:
        """Return ``R Σ_n J_nᵀ d_n d_nᵀ J_n V`` on one batch."""
        output_matmat = EmpiricalFisherOutputMatmat(self._loss, self.num_data)
        return self._backend.gauss_newton_matmat(
            columns, batch, output_matmat, rng, compiled=self._compile
        )
