"""The linearised (GLM) predictive of a Laplace posterior and its class probabilities.

For ``f(x; θ) ≈ f(x; θ*) + J(x) (θ − θ*)`` and ``θ ~ N(θ*, P⁻¹)``, the outputs are
Gaussian: mean ``f(x; θ*)``, covariance ``J P⁻¹ Jᵀ`` (MacKay, 1992; Immer et al., 2021).
"""

from __future__ import annotations

import math
from typing import Any

import cola
from cola.ops import LinearOperator

from cola_curvature.backends._protocol import CurvatureBackend
from cola_curvature.losses import BCEWithLogits
from cola_curvature.options import PredictiveMethod, parse_option
from cola_curvature.types import Array
from dispatch_rules.sqrt import inverse_factor


def glm_predictive(
    backend: CurvatureBackend, precision: LinearOperator, inputs: Any, indices: Array | None
) -> tuple[Array, Array]:
    """Return the mean ``f(x)`` ``(N, …)`` and the per-input covariances ``J P⁻¹ Jᵀ`` ``(N, C, C)``.

    ``C`` is the number of outputs per input (all output axes flattened row-major). ``P⁻¹``
    is applied to the ``N C`` Jacobian rows (their columns ``indices`` of an index
    subnetwork) through ``cola.linalg.inv``, never densely; only the per-input ``C × C``
    blocks are formed (``O(N C D)`` memory).
    """
    outputs, jacobian = backend.output_jacobian(inputs)
    num_inputs, outputs_per_input = outputs.shape[0], math.prod(outputs.shape[1:])
    rows = jacobian.reshape(-1, jacobian.shape[-1])
    if indices is not None:
        rows = rows[:, indices]
    solved = cola.linalg.inv(precision) @ rows.T
    per_input = rows.reshape(num_inputs, outputs_per_input, -1)
    columns = solved.T.reshape(num_inputs, outputs_per_input, -1)
    return outputs, per_input @ precision.xnp.moveaxis(columns, -1, -2)


def class_probabilities(
    backend: CurvatureBackend,
    loss: Any,
    mean: Array,
    covariance: Array,
    method: PredictiveMethod,
    num_samples: int,
    seed: int,
) -> Array:
    """Return the GLM predictive's class probabilities, in the shape of ``mean``.

    ``"probit"``: ``softmax(f / √(1 + π/8 · diag Σ_f))`` (MacKay, 1992), one pass.
    ``"mc"``: the average of ``softmax(f + L z)`` over ``num_samples`` draws
    ``z ~ N(0, I)``, ``L Lᵀ = Σ_f`` (a jitter of ``1e-10 · max diag`` keeps ``L`` real).
    For ``BCEWithLogits`` the sigmoid replaces the softmax, which otherwise runs over the
    class axis 1 at each position.
    """
    xnp = cola.backends.get_library_fns(mean.dtype)

    def link(f: Array, class_axis: int) -> Array:
        if isinstance(loss, BCEWithLogits):
            return 1 / (1 + xnp.exp(-f))
        return xnp.softmax(f, axis=class_axis)

    if method is PredictiveMethod.PROBIT:
        variances = xnp.stack([covariance[n].diagonal() for n in range(mean.shape[0])])
        return link(mean / xnp.sqrt(1 + math.pi / 8 * variances.reshape(mean.shape)), 1)
    size = covariance.shape[-1]
    eye = xnp.eye(size, size, dtype=mean.dtype, device=xnp.get_device(mean))
    jitter = 1e-10 * xnp.abs(covariance).max() * eye
    factor = xnp.cholesky(covariance + jitter)
    noise = backend.random(seed).normal((num_samples, mean.shape[0], size, 1), mean)
    samples = mean[None] + (factor[None] @ noise)[..., 0].reshape((num_samples, *mean.shape))
    return link(samples, 2).mean(0)


class PosteriorPredictive:
    """The predictive and the samples of a Laplace posterior ``N(θ*, P⁻¹)``.

    Mixed into :class:`~cola_curvature.Laplace`, which provides ``_backend``, ``_loss``,
    ``_mean`` (``θ*``), ``_indices``, ``_input_shape``, ``regression`` and
    ``posterior_precision()``.
    """

    def predictive(self, inputs: Any) -> tuple[Array, Array]:
        """Return the linearised (GLM) predictive mean ``f(x)`` and covariance ``J P⁻¹ Jᵀ``.

        Shapes: mean ``(N, C)``, covariance ``(N, C, C)`` of the function values (add
        ``σ²`` for the observation noise of regression). Outputs with more axes, e.g. a
        language model's logits ``(N, V, T)``, give the mean in that shape and the joint
        covariance ``(N, C, C)`` of each input's ``C = V T`` outputs flattened row-major
        (``reshape(N, -1)``). ``P⁻¹`` (``cola.linalg.inv``) is applied to the ``N C``
        Jacobian rows (their columns in the subset, if any), never densely; only the
        per-input ``C × C`` blocks are formed (``O(N C D)`` memory). With ``"ggn"`` every
        row is a column of one batched CG solve: slow for many inputs.
        """
        shape = tuple(getattr(inputs, "shape", ())[1:])
        if self._input_shape and shape != self._input_shape:
            raise ValueError(
                f"inputs have shape {tuple(inputs.shape)}; the training inputs were "
                f"(N, {', '.join(map(str, self._input_shape))})."
            )
        return glm_predictive(self._backend, self.posterior_precision(), inputs, self._indices)

    def predictive_probabilities(
        self,
        inputs: Any,
        method: str | PredictiveMethod = "probit",
        num_samples: int = 100,
        seed: int = 0,
    ) -> Array:
        """Return class probabilities of the GLM predictive (classification only).

        ``"probit"`` (MacKay, 1992) or ``"mc"`` (``num_samples`` draws): see
        :func:`~cola_curvature.laplace_predictive.class_probabilities`. The result has the
        shape of the outputs; for outputs ``(N, C, d_1, …)`` (e.g. a language model's
        ``(N, V, T)``) the softmax runs over the class axis 1 at each position.
        """
        if self.regression:
            raise ValueError("predictive_probabilities is for classification losses.")
        method = parse_option(PredictiveMethod, method, "method")
        mean, covariance = self.predictive(inputs)
        return class_probabilities(
            self._backend, self._loss, mean, covariance, method, num_samples, seed
        )

    def sample(self, num_samples: int, seed: int = 0) -> Array:
        """Return ``θ* + L z``, ``z ~ N(0, I)``, ``L Lᵀ = P⁻¹``, shape ``(D, num_samples)``.

        ``L`` is :func:`dispatch_rules.sqrt.inverse_factor` of ``P``: ``P^{-1/2}``
        (``cola.linalg.isqrt``), exact for the Kronecker-factored posteriors and by Lanczos
        for the matrix-free ones (all samples together, one product with ``num_samples``
        columns per step); for ``"lowrank"`` the exact ``O(D k²)`` factor of
        :meth:`DiagonalPlusLowRank.inverse_factor`.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}.")
        like = self._mean[:1]
        noise = self._backend.random(seed).normal((self._mean.shape[0], num_samples), like)
        return self._mean[:, None] + inverse_factor(self.posterior_precision()) @ noise
