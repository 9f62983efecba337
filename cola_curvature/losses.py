"""Backend-neutral losses: value, output gradient and Hessian, its factor, sampling."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Protocol

from cola.backends import get_library_fns

from cola_curvature._tracing import is_traced
from cola_curvature.options import Reduction, parse_option
from cola_curvature.types import Array


class RandomSource(Protocol):
    """A seeded source of random numbers supplied by a backend.

    Monte-Carlo targets are drawn as one array of shape ``(M, N, *entry)``: entry
    ``[m, n]`` belongs to sample ``m`` of the batch's example ``n``. In the sources the
    operators use (``example_random`` of a backend), the numbers of example ``n`` depend
    only on the seed, ``n``'s global index in the data and the shape ``(M, *entry)``, so an
    example's samples do not depend on how the data is split into batches.
    """

    def uniform(self, shape: tuple[int, ...], like: Array) -> Array:
        """Return samples from U[0, 1) with dtype and device of ``like``."""

    def normal(self, shape: tuple[int, ...], like: Array) -> Array:
        """Return samples from N(0, 1) with dtype and device of ``like``."""


class Loss(ABC):
    """A loss ``ℓ(f, y)`` that is a sum of independent terms over positions of the output.

    The curvature operators use a loss only through these methods, on one batch of
    outputs ``f`` (shape ``(N, ...)``, example axis first) and targets ``y``:

    - :meth:`check_target` ``(f, y)``: called first on every batch; raise ``ValueError``.
    - :meth:`sum_value`: ``Σ_n ℓ(f_n, y_n)`` (the Hessian operator differentiates it).
    - :meth:`output_gradient`: ``∇_f Σ_n ℓ`` (empirical Fisher, Monte-Carlo Fisher).
    - :meth:`hessian_matmat`: ``∇²_{f_n} ℓ · u_n`` per example (GGN). Must be PSD.
    - :meth:`hessian_sqrt`: ``S`` with ``Σ_k S[k, n] S[k, n]ᵀ = ∇²_{f_n} ℓ`` (KFAC type-2,
      diagonal curvature).
    - :meth:`sample`: targets ``ŷ ~ q(·|f)`` of the likelihood ``q`` whose negative log is
      ``ℓ`` (Monte-Carlo Fisher, ``fisher_type="mc"``); raise ``ValueError`` if there is none.
    - :meth:`terms_per_example` and :meth:`scale`: the ``"mean"`` divisor ``N · T``.

    Writing a loss: subclass ``Loss`` and implement the six abstract methods with the
    array operations of :func:`cola.backends.get_library_fns` (``xnp``), so one class
    serves torch and JAX; override :meth:`terms_per_example` if ``"mean"`` does not
    divide by ``numel(f_n)``. A loss that is ``-log q(y|f)`` of an exponential family with
    natural parameter ``f`` has ``E_{ŷ~q}[∇ℓ ∇ℓᵀ] = ∇²_f ℓ``, so its Monte-Carlo Fisher
    estimates its GGN. A loss whose output Hessian depends on the targets reads them from
    the ``y`` of :meth:`hessian_matmat` / :meth:`hessian_sqrt`. Pass the object as
    ``loss_func`` to any operator; the README's "Custom losses" section has a complete
    example, and
    :class:`~cola_curvature.losses_callable.CallableLoss` derives all methods from one
    function by autodiff.

    Args:
        reduction: ``"sum"`` or ``"mean"`` (see :class:`Reduction`).

    """

    def __init__(self, reduction: str | Reduction = "mean") -> None:
        self.reduction = parse_option(Reduction, reduction, "reduction")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction.value!r})"

    @abstractmethod
    def sum_value(self, f: Array, y: Array) -> Array:
        """Return ``Σ_n ℓ(f_n, y_n)`` over a batch (the ``"sum"``-reduced loss)."""

    @abstractmethod
    def output_gradient(self, f: Array, y: Array) -> Array:
        """Return ``∇_f Σ_n ℓ(f_n, y_n)``, the same shape as ``f``."""

    @abstractmethod
    def hessian_matmat(self, f: Array, u: Array, y: Array | None = None) -> Array:
        """Return ``∇²_f ℓ · u`` for ``u`` of shape ``(k, *f.shape)``, applied per example.

        ``y`` are the batch's targets; only a loss whose output Hessian depends on them
        (Huber, :class:`~cola_curvature.losses_callable.CallableLoss`) reads them, and
        raises without them (:func:`required_targets`). The operators always pass them.
        """

    @abstractmethod
    def hessian_sqrt(self, f: Array, y: Array | None = None) -> Array:
        """Return an exact symmetric factor ``S`` of each example's output Hessian at ``y``.

        ``S`` has shape ``(K, *f.shape)`` with ``K = numel(f_n)`` columns per example, and
        ``Σ_k vec(S[k, n]) vec(S[k, n])ᵀ = ∇²_{f_n} ℓ(f_n, y_n)`` for every example ``n``.
        Columns never mix positions of a sequence or image output, so backpropagating them
        gives the exact type-2 Fisher (= GGN) statistics for any architecture.
        """

    @abstractmethod
    def sample(self, f: Array, rng: RandomSource, num_samples: int) -> Array:
        """Draw targets ``ŷ_{mn} ~ q(· | f_n)``, shape ``(num_samples, *targets of f)``.

        One draw of shape ``(num_samples, N, *entry)`` from ``rng`` (see
        :class:`RandomSource`): sample ``m`` of example ``n`` uses entry ``[m, n]`` only.
        """

    def sampled_output_gradients(self, f: Array, rng: RandomSource, num_samples: int) -> Array:
        """Return ``∇_f ℓ(f, ŷ_m)`` for ``ŷ_m ~ q(· | f)``, shape ``(num_samples, *f.shape)``.

        The targets of all samples come from one :meth:`sample` call, so ``E[d dᵀ] = ∇²_f ℓ``
        per example; every user of Monte-Carlo targets draws them this way, so the same
        ``rng`` gives the same targets everywhere. The gradients are taken on ``f`` repeated
        ``num_samples`` times along the example axis, one broadcast (not a concatenation of
        ``num_samples`` copies, which JAX compiles in time linear in ``num_samples``).
        """
        xnp = get_library_fns(f.dtype)
        targets = self.sample(f, rng, num_samples)
        ones = xnp.ones((num_samples,) + (1,) * f.ndim, dtype=f.dtype, device=xnp.get_device(f))
        rows = num_samples * f.shape[0]
        stacked = (ones * f[None]).reshape((rows,) + tuple(f.shape[1:]))
        flat_targets = targets.reshape((rows,) + tuple(targets.shape[2:]))
        gradients = self.likelihood_gradient(stacked, flat_targets)
        return gradients.reshape((num_samples,) + tuple(f.shape))

    def likelihood_gradient(self, f: Array, y: Array) -> Array:
        """Return ``∇_f (-log q(y | f))`` at sampled targets: :meth:`output_gradient` here.

        Losses that are not exactly ``-log q`` (label smoothing) override it, so that
        Monte-Carlo gradients keep ``E[d dᵀ] = ∇²_f ℓ``.
        """
        return self.output_gradient(f, y)

    @abstractmethod
    def check_target(self, f: Array, y: Array) -> None:
        """Raise ``ValueError`` when the targets ``y`` do not fit the outputs ``f``."""

    def terms_per_example(self, f: Array) -> int:
        """Return the number of loss terms one example contributes (mean's divisor)."""
        return math.prod(f.shape[1:])

    def scale(self, f: Array, num_data: int) -> float:
        """Return ``R`` in ``L = R Σ_n ℓ_n`` for a data set of ``num_data`` examples."""
        if self.reduction is Reduction.SUM:
            return 1.0
        return 1.0 / (num_data * self.terms_per_example(f))


def required_targets(loss: Loss, y: Array | None) -> Array:
    """Return the targets a loss's output Hessian depends on; raise when none were given.

    Raises:
        ValueError: when ``y`` is ``None``.
    """
    if y is None:
        raise ValueError(
            f"{type(loss).__name__}'s output Hessian depends on the targets: pass y to "
            "hessian_matmat / hessian_sqrt."
        )
    return y


def _diagonal_factor(f: Array, sqrt_diagonal: Array) -> Array:
    """Return ``S[k, n] = √h_{n,k} e_k`` for a diagonal per-example Hessian ``diag(h_n)``."""
    xnp = get_library_fns(f.dtype)
    size = math.prod(f.shape[1:])
    eye = xnp.eye(size, size, dtype=f.dtype, device=xnp.get_device(f))
    eye = eye.reshape((size, 1) + tuple(f.shape[1:]))
    return eye * sqrt_diagonal[None]


class MSE(Loss):
    r"""Squared error ``ℓ(f, y) = Σ_i (f_i - y_i)²``, as ``torch.nn.MSELoss``.

    The likelihood is ``q(y | f) = N(f, ½ I)``, so ``ℓ = -log q + const`` exactly and the
    output Hessian is ``∇²_f ℓ = 2 I``: the GGN of ``MSELoss(reduction="sum")`` carries
    the factor 2 (twice the Gaussian NLL with unit variance). ``"mean"`` divides by the
    total number of output entries ``N · numel(f_n)``.
    """

    def sum_value(self, f: Array, y: Array) -> Array:
        """Return ``Σ (f - y)²``."""
        return ((f - y) ** 2).sum()

    def output_gradient(self, f: Array, y: Array) -> Array:
        """Return ``2 (f - y)``."""
        return 2 * (f - y)

    def hessian_matmat(self, f: Array, u: Array, y: Array | None = None) -> Array:
        """Return ``2 u``."""
        return 2 * u

    def hessian_sqrt(self, f: Array, y: Array | None = None) -> Array:
        """Return ``√2 e_k`` for every output entry ``k``, shape ``(numel(f_n), *f.shape)``."""
        return _diagonal_factor(f, math.sqrt(2.0) * (0 * f + 1))

    def sample(self, f: Array, rng: RandomSource, num_samples: int) -> Array:
        """Return ``f + ε_m / √2`` with ``ε_m ~ N(0, I)``, shape ``(num_samples, *f.shape)``."""
        return f[None] + rng.normal((num_samples,) + tuple(f.shape), f) / math.sqrt(2.0)

    def check_target(self, f: Array, y: Array) -> None:
        """Require ``y`` of the same shape as ``f``."""
        if tuple(y.shape) != tuple(f.shape):
            raise ValueError(
                f"MSE needs targets of the same shape as the model output {tuple(f.shape)}, "
                f"got {tuple(y.shape)}; reshape the targets (e.g. y.unsqueeze(-1))."
            )


class CrossEntropy(Loss):
    r"""Softmax cross-entropy ``ℓ(f, y) = -log softmax(f)_y``, as ``torch.nn.CrossEntropyLoss``.

    Outputs are ``(N, C)`` or ``(N, C, d_1, …)`` with class axis 1 and integer targets of
    shape ``(N,)`` or ``(N, d_1, …)``; each position ``(d_1, …)`` is one term. With
    ``p = softmax(f)`` the output Hessian per term is ``diag(p) - p pᵀ`` and
    ``S = diag(√p) - p √pᵀ`` satisfies ``S Sᵀ = diag(p) - p pᵀ`` (because ``Σ p = 1``).
    ``"mean"`` divides by ``N · d_1 ⋯``.

    Label smoothing ``ε`` (as torch's ``label_smoothing``) replaces the one-hot target by
    ``t = (1 - ε) onehot(y) + ε / C``: ``ℓ = -Σ_c t_c log p_c``, gradient ``p - t``. Since
    ``Σ_c t_c = 1`` the output Hessian (GGN, type-2 factor) is unchanged. Monte-Carlo
    targets are still drawn from ``softmax(f)`` and their gradients are those of the
    unsmoothed ``-log p_ŷ`` (:meth:`likelihood_gradient`), so the Monte-Carlo Fisher
    estimates the GGN; the empirical Fisher uses the smoothed gradient at the data.

    Args:
        reduction: ``"sum"`` or ``"mean"``.
        label_smoothing: ``ε`` in ``[0, 1]``.
    """

    def __init__(self, reduction: str | Reduction = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__(reduction)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}.")
        self.label_smoothing = float(label_smoothing)

    def _smoothed(self, y: Array, f: Array) -> Array:
        """Return the smoothed targets ``(1 - ε) onehot(y) + ε / C`` along axis 1."""
        epsilon = self.label_smoothing
        return (1 - epsilon) * self._one_hot(y, f) + epsilon / f.shape[1]

    def _probabilities(self, f: Array) -> Array:
        """Return ``softmax(f)`` along the class axis."""
        return get_library_fns(f.dtype).softmax(f, axis=1)

    def _one_hot(self, y: Array, f: Array) -> Array:
        """Return the one-hot encoding of ``y`` along axis 1, dtype of ``f``."""
        xnp = get_library_fns(f.dtype)
        num_classes = f.shape[1]
        classes = xnp.arange(num_classes, device=xnp.get_device(f))
        classes = classes.reshape((1, num_classes) + (1,) * (f.ndim - 2))
        labels = y.reshape((y.shape[0], 1) + tuple(y.shape[1:]))
        return xnp.cast(labels == classes, f.dtype)

    def terms_per_example(self, f: Array) -> int:
        """Return ``d_1 ⋯`` (one term per position; the class axis is not averaged)."""
        return math.prod(f.shape[2:])

    def sum_value(self, f: Array, y: Array) -> Array:
        """Return ``-Σ t · log softmax(f)`` (``t = onehot(y)`` without smoothing)."""
        xnp = get_library_fns(f.dtype)
        return -(self._smoothed(y, f) * xnp.log_softmax(f, axis=1)).sum()

    def output_gradient(self, f: Array, y: Array) -> Array:
        """Return ``softmax(f) - t``."""
        return self._probabilities(f) - self._smoothed(y, f)

    def likelihood_gradient(self, f: Array, y: Array) -> Array:
        """Return ``softmax(f) - onehot(y)``, the gradient of ``-log p_y`` (no smoothing)."""
        return self._probabilities(f) - self._one_hot(y, f)

    def hessian_matmat(self, f: Array, u: Array, y: Array | None = None) -> Array:
        """Return ``p ⊙ u - p (pᵀ u)`` along the class axis."""
        p = self._probabilities(f)
        pu = p * u
        return pu - p * pu.sum(2, keepdims=True)

    def hessian_sqrt(self, f: Array, y: Array | None = None) -> Array:
        """Return ``S[(c, p)] = √p_c (e_c - p)`` at position ``p`` only, ``K = C · d_1 ⋯``.

        Shape ``(C · P, *f.shape)`` with ``P = d_1 ⋯`` positions; column ``(c, p)`` is zero
        outside position ``p``.
        """
        xnp = get_library_fns(f.dtype)
        num_examples, num_classes = f.shape[0], f.shape[1]
        positions = math.prod(f.shape[2:])
        device = xnp.get_device(f)
        p = self._probabilities(f).reshape(num_examples, num_classes, positions)
        eye_classes = xnp.eye(num_classes, num_classes, dtype=f.dtype, device=device)
        sqrt_p = xnp.moveaxis(xnp.sqrt(p), 1, 0)[:, :, None]
        per_position = sqrt_p * (eye_classes.reshape(num_classes, 1, num_classes, 1) - p[None])
        eye_positions = xnp.eye(positions, positions, dtype=f.dtype, device=device)
        full = per_position[:, None] * eye_positions.reshape(1, positions, 1, 1, positions)
        return full.reshape((num_classes * positions,) + tuple(f.shape))

    def sample(self, f: Array, rng: RandomSource, num_samples: int) -> Array:
        """Draw labels ``(num_samples, N, d_1, …)`` from ``softmax(f)`` by inverting its cumsum."""
        xnp = get_library_fns(f.dtype)
        cumulative = xnp.moveaxis(self._probabilities(f), 1, -1).cumsum(-1)[None]
        u = rng.uniform((num_samples,) + tuple(cumulative.shape[1:-1]) + (1,), f)
        below = xnp.cast(cumulative[..., :-1] < u, xnp.int32)  # int32: JAX has no int64 without x64
        return below.sum(-1)

    def check_target(self, f: Array, y: Array) -> None:
        """Require integer labels of shape ``(N, d_1, …)`` for outputs ``(N, C, d_1, …)``."""
        expected = (f.shape[0],) + tuple(f.shape[2:])
        if f.ndim < 2 or tuple(y.shape) != expected:
            raise ValueError(
                f"CrossEntropy needs outputs (N, C, ...) and integer labels of shape "
                f"(N, ...) = {expected}; got outputs {tuple(f.shape)} and labels "
                f"{tuple(y.shape)}. Class-probability targets are not supported."
            )
        if "int" not in str(y.dtype):
            raise ValueError(f"CrossEntropy needs integer class labels, got dtype {y.dtype}.")
        # Values are only checked eagerly; under jax.jit the shape check above still runs.
        if not is_traced(y) and (bool((y < 0).any()) or bool((y >= f.shape[1]).any())):
            raise ValueError(
                f"CrossEntropy labels must lie in [0, {f.shape[1]}); got values from "
                f"{int(y.min())} to {int(y.max())}. Padding with ignore_index (-100) is not "
                "supported: drop those positions from the data."
            )


# The further losses live in their own modules and import the base classes above.
from cola_curvature.losses_callable import CallableLoss  # noqa: E402
from cola_curvature.losses_extra import (  # noqa: E402
    NLL,
    BCEWithLogits,
    GaussianNLL,
    Huber,
    PoissonNLL,
    SmoothL1,
)

SUPPORTED_LOSSES = (
    MSE,
    CrossEntropy,
    NLL,
    BCEWithLogits,
    GaussianNLL,
    PoissonNLL,
    Huber,
    SmoothL1,
    CallableLoss,
)

__all__ = [
    "SUPPORTED_LOSSES",
    "BCEWithLogits",
    "CallableLoss",
    "CrossEntropy",
    "GaussianNLL",
    "Huber",
    "Loss",
    "MSE",
    "NLL",
    "PoissonNLL",
    "RandomSource",
    "SmoothL1",
    "required_targets",
]
