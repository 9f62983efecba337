"""The generalized Gauss-Newton matrix as a matrix-free CoLA operator."""

from __future__ import annotations

from typing import Any

from cola.annotations import PSD

from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._output_space import GaussNewtonOutputMatmat
from cola_curvature.types import Array


class GGN(CurvatureOperator):
    r"""Generalized Gauss-Newton matrix ``G = R Σ_n J_nᵀ H_n J_n`` (Schraudolph, 2002).

    ``J_n = ∂f_θ(x_n)/∂θ`` is the Jacobian of the model output, ``H_n = ∇²_f ℓ(f_n, y_n)``
    the loss Hessian w.r.t. the output (applied analytically), ``R = 1`` for ``"sum"`` and
    ``R = 1 / (N · T)`` for ``"mean"`` (``T`` loss terms per example). For the
    exponential-family losses here ``G`` equals the type-2 Fisher.

    Shapes: ``D`` parameter entries; ``G @ v`` takes ``(D,)``, ``(D, k)`` or a list of
    tensors shaped like ``params``.

    Cost per product and batch (torch): one forward pass with dual tensors (``J v``) that
    also records the graph, plus one backward pass (``Jᵀ u``): about 1.5 gradients; further
    columns replay only the tangent operations, about 0.95 gradients per column for 8
    (small CNN, ``benchmarks/RESULTS.md``). Annotation: ``PSD``.

    Reference: Schraudolph, "Fast curvature matrix-vector products for second-order
    gradient descent", Neural Computation 2002.
    """

    annotation = PSD
    compilable = True

    def _batch_matmat(self, columns: list[Array], batch: tuple[Any, Any], rng: Any) -> list[Array]:
        """Return ``R Jᵀ H J V`` on one batch."""
        output_matmat = GaussNewtonOutputMatmat(self._loss, self.num_data)
        return self._backend.gauss_newton_matmat(
            columns, batch, output_matmat, rng, compiled=self._compile
        )
