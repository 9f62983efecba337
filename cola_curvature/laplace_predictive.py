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
from cola_curvature.options import PredictiveMethod
from cola_curvature.types import Array


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
