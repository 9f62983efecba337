"""The second moment of the per-example gradients as a matrix-free CoLA operator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cola.annotations import PSD

from cola_curvature.losses import Loss
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._output_space import outer_product_matmat
from cola_curvature.types import Array


def _example_scale(loss: Loss, f: Array) -> float:
    """Return ``ρ``: example ``n``'s own loss is ``ρ ℓ_n`` (``1`` for sum, ``1 / T`` for mean)."""
    return loss.scale(f, 1)


@dataclass(frozen=True)
class GradientMomentOutputMatmat:
    """``(f, y, JV, rng) ↦ (ρ² / N) d dᵀ (J V)`` per example, ``d = ∇_f ℓ(f, y)``."""

    loss: Loss
    num_data: int

    def __call__(self, f: Array, y: Array, jv: Array, rng: Any) -> Array:
        """Return ``(ρ² / N) d_n d_nᵀ (J V)_n`` per example (``rng`` unused)."""
        self.loss.check_target(f, y)
        d = self.loss.output_gradient(f, y)
        scale = _example_scale(self.loss, f) ** 2 / self.num_data
        return scale * outer_product_matmat(d[None], jv)


@dataclass(frozen=True)
class MeanExampleLoss:
    """``(f, y) ↦ (ρ / N) Σ_{n ∈ batch} ℓ(f_n, y_n)``: its gradient is the batch's part of ḡ."""

    loss: Loss
    num_data: int

    def __call__(self, f: Array, y: Array) -> Array:
        """Return the batch's share of the mean per-example loss."""
        self.loss.check_target(f, y)
        return _example_scale(self.loss, f) / self.num_data * self.loss.sum_value(f, y)


class GradientMoments(CurvatureOperator):
    r"""Second moment of the per-example gradients, ``M = (1/N) Σ_n g_n g_nᵀ``.

    ``g_n = ∇_θ (ρ ℓ_n)`` is the gradient of example ``n``'s loss as the loss function
    computes it for that example alone: ``ℓ_n`` sums the example's ``T`` loss terms and
    ``ρ = 1`` for ``reduction="sum"``, ``ρ = 1 / T`` for ``"mean"`` (e.g. torch's
    ``loss_func(model(x[n:n+1]), y[n:n+1])``). With ``centered=True`` the operator is the
    covariance ``(1/N) Σ_n (g_n - ḡ)(g_n - ḡ)ᵀ = M - ḡ ḡᵀ`` with ``ḡ = (1/N) Σ_n g_n``
    (for ``"mean"``, ``ḡ`` is the gradient of the empirical risk), computed once at
    construction in one pass over the data.

    Relation to :class:`~cola_curvature.EmpiricalFisher`
    ``E = R Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ`` (``R = 1`` for sum, ``1 / (N T)`` for mean): ``M = E / T``
    for ``"mean"`` and ``M = E / N`` for ``"sum"``. So with ``"mean"`` and one loss term per
    example (classification), ``M = E``, which is curvlinops' ``EFLinearOperator`` (its
    "uncentered gradient covariance"); for ``"sum"``, curvlinops' operator is ``N M``.
    ``N`` is ``num_data`` when given.

    Products need no per-example gradients: ``g_n = ρ J_nᵀ d_n`` with ``d_n = ∇_f ℓ_n``,
    so ``M v = (ρ² / N) Σ_n J_nᵀ d_n (d_nᵀ J_n v)``, a Gauss-Newton product with a rank-one
    output matrix, and the centred operator subtracts ``ḡ (ḡᵀ v)``.

    Shapes: ``D`` parameter entries; ``M @ v`` takes ``(D,)``, ``(D, k)`` or a list of
    tensors / a pytree shaped like ``params``.

    Cost per product and batch: as the empirical Fisher, about 1.5 gradients per column;
    ``centered=True`` adds one gradient pass over the data at construction.
    Annotation: ``PSD``.

    Args:
        *args: As :class:`~cola_curvature.operators._base.CurvatureOperator`.
        centered: Subtract the outer product of the mean gradient ``ḡ``.
        check_deterministic: As
            :class:`~cola_curvature.operators._base.CurvatureOperator` (the products
            compared are those of the uncentred moments).
        **kwargs: As :class:`~cola_curvature.operators._base.CurvatureOperator`.

    """

    annotation = PSD

    def __init__(
        self,
        *args: Any,
        centered: bool = False,
        check_deterministic: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(centered, bool):
            raise TypeError(f"centered must be True or False, got {centered!r}.")
        self._mean_gradient = None
        super().__init__(*args, check_deterministic=check_deterministic, **kwargs)
        if centered:
            self._mean_gradient = self._compute_mean_gradient()

    @property
    def centered(self) -> bool:
        """Whether ``ḡ ḡᵀ`` is subtracted."""
        return self._mean_gradient is not None

    def _compute_mean_gradient(self) -> list[Array]:
        """Return ``ḡ = (1/N) Σ_n g_n`` per parameter: one gradient per batch."""
        backend = self._backend
        risk = MeanExampleLoss(self._loss, self.num_data)
        total = None
        with backend.preserved_state():
            for batch in self._data.batches("GradientMoments: mean gradient"):
                gradient = backend.gradient(batch, risk)
                total = (
                    gradient
                    if total is None
                    else [t + g for t, g in zip(total, gradient, strict=True)]
                )
        return [c[0] for c in self._data.combine_columns([t[None] for t in total])]

    def _batch_matmat(self, columns: list[Array], batch: tuple[Any, Any], rng: Any) -> list[Array]:
        """Return ``(ρ² / N) Σ_n J_nᵀ d_n d_nᵀ J_n V`` on one batch."""
        output_matmat = GradientMomentOutputMatmat(self._loss, self.num_data)
        return self._backend.gauss_newton_matmat(columns, batch, output_matmat, rng)

    def _matmat_columns(self, columns: list[Array]) -> list[Array]:
        """Return ``M V``, minus ``ḡ (ḡᵀ V)`` when centred, per parameter."""
        moments = super()._matmat_columns(columns)
        if self._mean_gradient is None:
            return moments
        k = columns[0].shape[0]
        pairs = list(zip(self._mean_gradient, columns, strict=True))
        projections = sum((g.reshape(1, -1) * c.reshape(k, -1)).sum(1) for g, c in pairs)
        return [
            m - projections.reshape((k,) + (1,) * g.ndim) * g[None]
            for m, g in zip(moments, self._mean_gradient, strict=True)
        ]
