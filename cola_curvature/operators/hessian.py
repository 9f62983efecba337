"""The Hessian of the empirical risk as a matrix-free CoLA operator."""

from __future__ import annotations

from typing import Any

from cola.annotations import SelfAdjoint

from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._output_space import ScaledRisk
from cola_curvature.types import Array


class Hessian(CurvatureOperator):
    r"""Hessian ``H = ∇²_θ L(θ)`` of ``L(θ) = R Σ_n ℓ(f_θ(x_n), y_n)`` (Pearlmutter, 1994).

    ``R = 1`` for ``"sum"`` and ``R = 1 / (N · T)`` for ``"mean"`` (``T`` loss terms per
    example). ``H`` is symmetric and in general indefinite.

    Shapes: ``D`` parameter entries; ``H @ v`` takes ``(D,)``, ``(D, k)`` or a list of
    tensors shaped like ``params``.

    Cost per product and batch (torch): double backward through one graph, about 2.4
    gradients for one column and 1.5 per column for 8 (small CNN); forward-over-reverse
    where a custom ``autograd.Function`` makes double backward unsafe. Annotation:
    ``SelfAdjoint``.

    Reference: Pearlmutter, "Fast exact multiplication by the Hessian", Neural
    Computation 1994.
    """

    annotation = SelfAdjoint
    compilable = True

    def _batch_matmat(self, columns: list[Array], batch: tuple[Any, Any], rng: Any) -> list[Array]:
        """Return ``∇²_θ (R Σ_{n ∈ batch} ℓ_n) V``."""
        risk = ScaledRisk(self._loss, self.num_data)
        return self._backend.hessian_matmat(columns, batch, risk, compiled=self._compile)
