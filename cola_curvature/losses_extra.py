"""Binary cross-entropy on logits, Gaussian and Poisson NLL, Huber, smooth L1, NLL (``torch.nn``).

The first five are sums over output entries with torch's ``"mean"`` (divide by
``N · numel(f_n)``), so :meth:`~cola_curvature.losses.Loss.terms_per_example` keeps its
default; :class:`NLL` averages over examples and positions as cross-entropy does.
"""

from __future__ import annotations

import math

from cola.backends import get_library_fns

from cola_curvature._loss_backend import upper_incomplete_gamma
from cola_curvature._tracing import is_abstract, scalar_value
from cola_curvature.losses import (
    Array,
    CrossEntropy,
    Loss,
    RandomSource,
    Reduction,
    _diagonal_factor,
    required_targets,
)


def _require_same_shape(loss: Loss, f: Array, y: Array) -> None:
    """Raise ``ValueError`` unless ``y`` is a floating-point array shaped like ``f``."""
    if tuple(y.shape) != tuple(f.shape):
        raise ValueError(
            f"{type(loss).__name__} needs targets of the same shape as the model output "
            f"{tuple(f.shape)}, got {tuple(y.shape)}."
        )
    if "float" not in str(y.dtype):
        raise ValueError(f"{type(loss).__name__} needs floating-point targets, got {y.dtype}.")


class BCEWithLogits(Loss):
    r"""Binary cross-entropy on logits, as ``torch.nn.BCEWithLogitsLoss``.

    ``ℓ(f, y) = Σ_i softplus(f_i) - y_i f_i``; with ``σ = sigmoid(f)`` the output
    Hessian is ``diag(σ (1 - σ))`` (independent of ``y``), factor ``√(σ(1 - σ))``.
    Targets lie in ``[0, 1]`` with the shape of ``f``. ``"mean"`` divides by the number
    of output entries.
    """

    def _sigmoid(self, f: Array) -> Array:
        """Return ``σ(f)``."""
        xnp = get_library_fns(f.dtype)
        return 1 / (1 + xnp.exp(-f))

    def sum_value(self, f: Array, y: Array) -> Array:
        """Return ``Σ max(f, 0) + log(1 + e^{-|f|}) - y f``."""
        xnp = get_library_fns(f.dtype)
        softplus = xnp.maximum(f, 0 * f) + xnp.log(1 + xnp.exp(-xnp.abs(f)))
        return (softplus - y * f).sum()

    def output_gradient(self, f: Array, y: Array) -> Array:
        """Return ``σ(f) - y``."""
        return self._sigmoid(f) - y

    def hessian_matmat(self, f: Array, u: Array, y: Array | None = None) -> Array:
        """Return ``σ(1 - σ) ⊙ u``."""
        s = self._sigmoid(f)
        return s * (1 - s) * u

    def hessian_sqrt(self, f: Array, y: Array | None = None) -> Array:
        """Return ``√(σ_k(1 - σ_k)) e_k`` per output entry, shape ``(numel(f_n), *f.shape)``."""
        xnp = get_library_fns(f.dtype)
        s = self._sigmoid(f)
        return _diagonal_factor(f, xnp.sqrt(s * (1 - s)))

    def sample(self, f: Array, rng: RandomSource, num_samples: int) -> Array:
        """Draw ``ŷ_m ~ Bernoulli(σ(f))``, shape ``(num_samples, *f.shape)``."""
        xnp = get_library_fns(f.dtype)
        u = rng.uniform((num_samples,) + tuple(f.shape), f)
        return xnp.cast(u < self._sigmoid(f)[None], f.dtype)

    def check_target(self, f: Array, y: Array) -> None:
        """Require float targets of the shape of ``f``."""
        if tuple(y.shape) != tuple(f.shape):
            raise ValueError(
                f"BCEWithLogits needs targets of the same shape as the model output "
                f"{tuple(f.shape)}, got {tuple(y.shape)}."
            )
        if "float" not in str(y.dtype):
            raise ValueError(
                f"BCEWithLogits needs floating-point targets in [0, 1], got dtype {y.dtype}."
            )


class GaussianNLL(Loss):
    r"""Gaussian negative log-likelihood with a fixed variance, as ``torch.nn.GaussianNLLLoss``.

    ``ℓ(f, y) = Σ_i ½ (log v + (f_i - y_i)² / v) [+ ½ log 2π if full]`` with
    ``v = max(var, eps)``, the model output ``f`` being the mean. Output Hessian ``I / v``,
    factor ``e_k / √v``; targets are sampled as ``f + √v ε``. A variance predicted by the
    model is not supported: ``∂²ℓ/∂v² = (2 r² - v) / (2 v³)`` is negative for
    ``r² < v / 2``, so that output Hessian is indefinite and has no GGN.

    Args:
        var: the variance, a positive number.
        full: add the constant ``½ log 2π`` per entry (changes the value only).
        eps: lower clamp of the variance, as torch's.
        reduction: ``"sum"`` or ``"mean"``.
    """

    def __init__(
        self,
        var: float = 1.0,
        full: bool = False,
        eps: float = 1e-6,
        reduction: str | Reduction = "mean",
    ) -> None:
        super().__init__(reduction)
        if not (isinstance(var, (int, float)) and var > 0):
            raise ValueError(
                f"GaussianNLL needs a fixed positive number var, got {var!r}; a variance "
                "that the model predicts makes the output Hessian indefinite (no GGN)."
            )
        self.var = max(float(var), eps)
        self.full = full

    def sum_value(self, f: Array, y: Array) -> Array:
        """Return ``Σ ½ (log v + (f - y)² / v) [+ ½ log 2π]``."""
        constant = 0.5 * math.log(self.var) + (0.5 * math.log(2 * math.pi) if self.full else 0.0)
        return (0.5 * (f - y) ** 2 / self.var + constant).sum()

    def output_gradient(self, f: Array, y: Array) -> Array:
        """Return ``(f - y) / v``."""
        return (f - y) / self.var

    def hessian_matmat(self, f: Array, u: Array, y: Array | None = None) -> Array:
        """Return ``u / v``."""
        return u / self.var

    def hessian_sqrt(self, f: Array, y: Array | None = None) -> Array:
        """Return ``e_k / √v`` for every output entry ``k``."""
        return _diagonal_factor(f, (0 * f + 1) / math.sqrt(self.var))

    def sample(self, f: Array, rng: RandomSource, num_samples: int) -> Array:
        """Return ``f + √v ε_m``, ``ε_m ~ N(0, I)``, shape ``(num_samples, *f.shape)``."""
        return f[None] + math.sqrt(self.var) * rng.normal((num_samples,) + tuple(f.shape), f)

    def check_target(self, f: Array, y: Array) -> None:
        """Require floating-point targets shaped like ``f``."""
        _require_same_shape(self, f, y)


#: Binary-search steps of the Poisson inverse CDF when the rates are traced (no values):
#: enough for every count a float64 represents exactly.
_TRACED_SEARCH_STEPS = 64


class PoissonNLL(Loss):
    r"""Poisson negative log-likelihood on log-rates, as ``PoissonNLLLoss(log_input=True)``.

    ``ℓ(f, y) = Σ_i e^{f_i} - y_i f_i [+ y log y - y + ½ log(2π y) for y > 1 if full]``:
    the model outputs the log-rate ``f``. Output Hessian ``diag(e^f)`` (PSD, independent
    of ``y``), factor ``e^{f/2}``; ``full`` changes the value only. Targets are counts
    ``ŷ ~ Poisson(e^f)``, drawn by inverting the CDF ``P(Y ≤ k) = Q(k + 1, λ)``.

    Args:
        full: add torch's Stirling term (constant in ``f``).
        reduction: ``"sum"`` or ``"mean"``.
    """

    def __init__(self, full: bool = False, reduction: str | Reduction = "mean") -> None:
        super().__init__(reduction)
        self.full = full

    def sum_value(self, f: Array, y: Array) -> Array:
        """Return ``Σ e^f - y f [+ Stirling term]``."""
        xnp = get_library_fns(f.dtype)
        value = (xnp.exp(f) - y * f).sum()
        if not self.full:
            return value
        counts = xnp.where(y > 1, y, 0 * y + 1)  # log is taken only where the term is kept
        stirling = counts * xnp.log(counts) - counts + 0.5 * xnp.log(2 * math.pi * counts)
        return value + xnp.where(y > 1, stirling, 0 * y).sum()

    def output_gradient(self, f: Array, y: Array) -> Array:
        """Return ``e^f - y``."""
        return get_library_fns(f.dtype).exp(f) - y

    def hessian_matmat(self, f: Array, u: Array, y: Array | None = None) -> Array:
        """Return ``e^f ⊙ u``."""
        return get_library_fns(f.dtype).exp(f) * u

    def hessian_sqrt(self, f: Array, y: Array | None = None) -> Array:
        """Return ``e^{f_k / 2} e_k`` per output entry."""
        return _diagonal_factor(f, get_library_fns(f.dtype).exp(f / 2))

    def sample(self, f: Array, rng: RandomSource, num_samples: int) -> Array:
        """Draw counts ``ŷ_m ~ Poisson(e^f)``: the least ``k`` with ``Q(k + 1, λ) ≥ u``.

        Binary search between ``-1`` and ``⌊λ + 20√λ + 20⌋`` (whose tail probability is
        below the resolution of ``u``); counts are returned in the dtype of ``f``.
        """
        xnp = get_library_fns(f.dtype)
        rate = xnp.exp(f)[None]
        u = rng.uniform((num_samples,) + tuple(f.shape), f)
        bound = rate + 20 * xnp.sqrt(rate) + 20
        high = (bound - bound % 1) + 0 * u
        low = 0 * u - 1
        steps = (
            _TRACED_SEARCH_STEPS
            if is_abstract(bound)
            else math.ceil(math.log2(float(bound.max()) + 2)) + 1
        )
        rates = rate + 0 * u

        def bisect(_: int, bracket: tuple[Array, Array]) -> tuple[Array, Array]:
            low, high = bracket
            middle = (low + high) / 2
            middle = middle - middle % 1
            covered = upper_incomplete_gamma(middle + 1, rates) >= u
            searching = high - low > 1
            return (
                xnp.where(searching & ~covered, middle, low),
                xnp.where(searching & covered, middle, high),
            )

        return xnp.for_loop(0, steps, bisect, (low, high))[1]

    def check_target(self, f: Array, y: Array) -> None:
        """Require floating-point counts shaped like ``f``."""
        _require_same_shape(self, f, y)


class Huber(Loss):
    r"""Huber loss, as ``torch.nn.HuberLoss``: quadratic within ``δ`` of the target, linear outside.

    ``ℓ(f, y) = Σ_i w · h_δ(f_i - y_i)`` with ``h_δ(r) = ½ r²`` for ``|r| < δ`` and
    ``δ (|r| - ½ δ)`` otherwise (``w = 1``). Output Hessian ``w · diag(1[|f - y| < δ])``:
    PSD, piecewise constant and dependent on the targets (the ``y`` of
    :meth:`hessian_matmat`). No likelihood: Monte-Carlo
    Fisher (``fisher_type="mc"``) raises.

    Args:
        delta: ``δ > 0``.
        reduction: ``"sum"`` or ``"mean"``.
    """

    weight = 1.0

    def __init__(self, delta: float = 1.0, reduction: str | Reduction = "mean") -> None:
        super().__init__(reduction)
        if not delta > 0:
            raise ValueError(f"{type(self).__name__} needs a positive threshold, got {delta!r}.")
        self.delta = float(delta)

    def _inside(self, f: Array, y: Array) -> Array:
        """Return ``1[|f - y| < δ]`` in the dtype of ``f``."""
        xnp = get_library_fns(f.dtype)
        return xnp.cast(xnp.abs(f - y) < self.delta, f.dtype)

    def sum_value(self, f: Array, y: Array) -> Array:
        """Return ``w Σ h_δ(f - y)``."""
        xnp = get_library_fns(f.dtype)
        r = xnp.abs(f - y)
        inside = self._inside(f, y)
        linear = self.delta * (r - 0.5 * self.delta)
        return self.weight * (inside * 0.5 * r**2 + (1 - inside) * linear).sum()

    def output_gradient(self, f: Array, y: Array) -> Array:
        """Return ``w · clip(f - y, -δ, δ)``."""
        xnp = get_library_fns(f.dtype)
        return self.weight * xnp.clip(f - y, -self.delta, self.delta)

    def hessian_matmat(self, f: Array, u: Array, y: Array | None = None) -> Array:
        """Return ``w · 1[|f - y| < δ] ⊙ u``."""
        return self.weight * self._inside(f, required_targets(self, y)) * u

    def hessian_sqrt(self, f: Array, y: Array | None = None) -> Array:
        """Return ``√w · 1[|f_k - y_k| < δ] e_k`` per output entry."""
        inside = self._inside(f, required_targets(self, y))
        return _diagonal_factor(f, math.sqrt(self.weight) * inside)

    def sample(self, f: Array, rng: RandomSource, num_samples: int) -> Array:
        """Raise: the Huber loss is no negative log-likelihood, there is nothing to sample."""
        raise ValueError(
            f"{type(self).__name__} is not the negative log-likelihood of a distribution, so "
            "it has no Monte-Carlo Fisher (FisherMC, fisher_type='mc'); use GGN / "
            "fisher_type='type-2' or the empirical Fisher."
        )

    def check_target(self, f: Array, y: Array) -> None:
        """Require floating-point targets shaped like ``f``."""
        _require_same_shape(self, f, y)


class SmoothL1(Huber):
    r"""Smooth L1 loss, as ``torch.nn.SmoothL1Loss``: the Huber loss with ``δ = β``, over ``β``.

    ``ℓ = Σ_i h_β(f_i - y_i) / β``, so ``w = 1 / β`` in :class:`Huber`'s formulas: Hessian
    ``diag(1[|f - y| < β]) / β``. ``β = 0`` (plain L1, zero Hessian almost everywhere) is
    refused.

    Args:
        beta: ``β > 0``.
        reduction: ``"sum"`` or ``"mean"``.
    """

    def __init__(self, beta: float = 1.0, reduction: str | Reduction = "mean") -> None:
        super().__init__(beta, reduction)
        self.weight = 1.0 / self.delta


class NLL(CrossEntropy):
    r"""Negative log-likelihood of log-probability outputs, as ``torch.nn.NLLLoss``: ``ℓ = -z_y``.

    The model ends in a log-softmax: its outputs ``z`` (``(N, C, d_1, …)``, classes on axis
    1) satisfy ``Σ_c exp(z_c) = 1``, which is checked on every batch. ``ℓ`` is linear in
    ``z``, so its literal output Hessian is zero; the output-space matrix used instead is
    the Fisher of the categorical likelihood in these coordinates,
    ``E_{ŷ~p}[∇_z ℓ ∇_z ℓᵀ] = diag(p)``, ``p = exp(z)``. Pulled back through
    ``z = log softmax(f)`` (``J_z = (I − 1 pᵀ) J_f``) it is
    ``J_fᵀ (diag(p) − p pᵀ) J_f``: the GGN of ``CrossEntropyLoss`` on the logits. So
    ``GGN``, KFAC type-2 and the Monte-Carlo Fisher of ``NLLLoss`` on a log-softmax model
    equal those of cross-entropy on the same model without it; ``Hessian`` and the
    empirical Fisher differentiate ``-z_y`` through the model as they are.

    Args:
        reduction: ``"sum"`` or ``"mean"``.
    """

    def __init__(self, reduction: str | Reduction = "mean") -> None:
        super().__init__(reduction)

    def _probabilities(self, f: Array) -> Array:
        """Return ``p = exp(z)``."""
        return get_library_fns(f.dtype).exp(f)

    def sum_value(self, f: Array, y: Array) -> Array:
        """Return ``-Σ z_y``."""
        return -(self._one_hot(y, f) * f).sum()

    def output_gradient(self, f: Array, y: Array) -> Array:
        """Return ``-onehot(y)``."""
        return -self._one_hot(y, f)

    def likelihood_gradient(self, f: Array, y: Array) -> Array:
        """Return ``-onehot(y)``: sampled labels give ``E[g gᵀ] = diag(p)``."""
        return -self._one_hot(y, f)

    def hessian_matmat(self, f: Array, u: Array, y: Array | None = None) -> Array:
        """Return ``p ⊙ u``: the categorical Fisher ``diag(p)`` in log-probabilities."""
        return self._probabilities(f) * u

    def hessian_sqrt(self, f: Array, y: Array | None = None) -> Array:
        """Return ``√p_k e_k`` per output entry."""
        return _diagonal_factor(f, get_library_fns(f.dtype).sqrt(self._probabilities(f)))

    def check_target(self, f: Array, y: Array) -> None:
        """Require :class:`CrossEntropy`'s labels and log-probability outputs (checked eagerly)."""
        super().check_target(f, y)
        if is_abstract(f):
            return
        totals = self._probabilities(f).sum(1)
        error = scalar_value(abs(totals - 1).max())
        if error > 1e3 * get_library_fns(f.dtype).finfo(f.dtype).eps:
            raise ValueError(
                f"NLL needs log-probabilities (a model ending in log_softmax over axis 1): "
                f"Σ_c exp(z_c) differs from 1 by {error:.2e}. For logits use CrossEntropyLoss."
            )
