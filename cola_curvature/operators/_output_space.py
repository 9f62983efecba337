"""Output-space matrices of the Gauss-Newton-type curvatures, applied to ``J V``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cola_curvature.losses import Loss
from cola_curvature.types import Array


def outer_product_matmat(d: Array, jv: Array) -> Array:
    """Return ``Σ_m d_{m,n} (d_{m,n}ᵀ (J V)_n)`` for every example ``n`` and column.

    ``d`` has shape ``(M, N, ...)`` (``M`` vectors per example) and ``jv`` shape
    ``(k, N, ...)``; inner products run over all non-batch axes of one example, so this
    applies the rank-``M`` matrix ``Σ_m d_{m,n} d_{m,n}ᵀ`` of each example's whole output.
    Cost and memory: ``O(M k N C)`` for ``C`` output entries per example.
    """
    num_vectors, num_columns, num_examples = d.shape[0], jv.shape[0], jv.shape[1]
    inner = (d[:, None] * jv[None]).reshape(num_vectors, num_columns, num_examples, -1).sum(-1)
    trailing = (1,) * (d.ndim - 2)
    weighted = inner.reshape((num_vectors, num_columns, num_examples) + trailing) * d[:, None]
    return weighted.sum(0)


# The output-space maps below are what an operator hands its backend for one batch. They are
# frozen dataclasses, equal (and hashing equal) when loss object, N and options are: the JAX
# backend compiles one program per distinct map, so operators rebuilt on the same model and
# loss (one per training step) share it instead of compiling again. Each map is its target
# check followed by its arithmetic (``unchecked``), which the torch backend's ``compile=True``
# route compiles while it runs ``check`` eagerly on the outputs.


@dataclass(frozen=True)
class _CheckedTargets:
    """Base of the maps below: ``check`` the targets, then apply ``unchecked``."""

    loss: Loss
    num_data: int

    def check(self, f: Array, y: Array) -> None:
        """Raise ``ValueError`` when the targets ``y`` do not fit the outputs ``f``."""
        self.loss.check_target(f, y)


@dataclass(frozen=True)
class GaussNewtonOutputMatmat(_CheckedTargets):
    """``(f, y, JV, rng) ↦ R ∇²_f ℓ(f, y) · (J V)``: the GGN's output-space matrix."""

    def __call__(self, f: Array, y: Array, jv: Array, rng: Any) -> Array:
        """Return ``R H_n (J V)_n`` per example (``rng`` unused: the matrix is exact)."""
        self.check(f, y)
        return self.unchecked(f, y, jv)

    def unchecked(self, f: Array, y: Array, jv: Array) -> Array:
        """Return ``R H_n (J V)_n`` per example without checking the targets."""
        return self.loss.scale(f, self.num_data) * self.loss.hessian_matmat(f, jv, y)


@dataclass(frozen=True)
class EmpiricalFisherOutputMatmat(_CheckedTargets):
    """``(f, y, JV, rng) ↦ R d dᵀ (J V)`` per example, ``d = ∇_f ℓ(f, y)``."""

    def __call__(self, f: Array, y: Array, jv: Array, rng: Any) -> Array:
        """Return ``R d_n d_nᵀ (J V)_n`` per example (``rng`` unused)."""
        self.check(f, y)
        return self.unchecked(f, y, jv)

    def unchecked(self, f: Array, y: Array, jv: Array) -> Array:
        """Return ``R d_n d_nᵀ (J V)_n`` per example without checking the targets."""
        d = self.loss.output_gradient(f, y)
        return self.loss.scale(f, self.num_data) * outer_product_matmat(d[None], jv)


@dataclass(frozen=True)
class MonteCarloFisherOutputMatmat(_CheckedTargets):
    """``(f, y, JV, rng) ↦ (R / M) Σ_m d̂_m d̂_mᵀ (J V)``, ``d̂_m`` gradients at sampled targets."""

    mc_samples: int

    def __call__(self, f: Array, y: Array, jv: Array, rng: Any) -> Array:
        """Return ``(R / M) Σ_m d̂_{nm} d̂_{nm}ᵀ (J V)_n`` per example, targets drawn from ``rng``."""
        self.check(f, y)
        samples = self.loss.sampled_output_gradients(f, rng, self.mc_samples)
        scale = self.loss.scale(f, self.num_data) / self.mc_samples
        return scale * outer_product_matmat(samples, jv)


@dataclass(frozen=True)
class ScaledRisk(_CheckedTargets):
    """``(f, y) ↦ R Σ_{n ∈ batch} ℓ(f_n, y_n)``: one batch's share of the risk ``L(θ)``."""

    def __call__(self, f: Array, y: Array) -> Array:
        """Return the batch's scaled summed loss."""
        self.check(f, y)
        return self.unchecked(f, y)

    def unchecked(self, f: Array, y: Array) -> Array:
        """Return the batch's scaled summed loss without checking the targets."""
        return self.loss.scale(f, self.num_data) * self.loss.sum_value(f, y)
