"""The Laplace evidence's parts: likelihood, prior terms per block, closed-form gradient, Adam.

With ``H``'s eigenvalues ``λ`` (Kronecker-factored ``H``: known per block), ``c = 1/(σ² T)``,
``n`` outputs, ``m_b = ‖θ*_b‖²`` and ``n_b`` entries per prior block ``b``, the evidence
``E = log p(D|θ*) − ½ Σ_b δ_b m_b + ½ Σ_b n_b log δ_b − ½ Σ_i log(c λ_i + δ_{b(i)})`` has
``∂E/∂ log δ_b = −½ δ_b m_b + ½ n_b − ½ Σ_{i∈b} δ_b / (c λ_i + δ_b)`` and, for regression
with ``S = Σ (f − y)²``, ``∂E/∂ log σ = S/(σ² T) − n/T + Σ_i c λ_i / (c λ_i + δ)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from cola.ops import LinearOperator
from tqdm import trange

from cola_curvature.backends._protocol import CurvatureBackend
from cola_curvature.operators._data import CurvatureData
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.types import Array


def negative_log_likelihood(
    backend: CurvatureBackend, loss: Any, data: CurvatureData
) -> tuple[Array, int, tuple[int, ...]]:
    """Return ``Σ ℓ(f(x_n), y_n)`` at ``θ*``, the output count ``n`` and one input's shape.

    The sum is the loss's own; the shape is that of the last batch's inputs without the
    batch axis. Distributed data (a rank's shard): sum and count are over all ranks.
    """
    total, count, input_shape = 0, 0, ()
    for inputs, targets in data.batches("negative log-likelihood"):
        input_shape = tuple(getattr(inputs, "shape", ())[1:])
        outputs = backend.forward(inputs)
        loss.check_target(outputs, targets)
        total = total + loss.sum_value(outputs, targets)
        count += math.prod(outputs.shape)
    if data.process_group is not None:
        total = data.combine(total)
        count = sum(data.process_group.gather_counts(count))
    return total, count, input_shape


def all_positive(value: Any) -> bool:
    """Return whether a number, or every entry of an array or sequence, is ``> 0``."""
    if isinstance(value, (int, float)):
        return value > 0
    if isinstance(value, (list, tuple)):
        return all(all_positive(v) for v in value)
    return bool((value > 0).all())


def check_prior_shape(delta: Array, curvature: LinearOperator) -> None:
    """Raise ``ValueError`` unless ``δ`` is a scalar or one value per block of a Kronecker ``H``."""
    if getattr(delta, "ndim", 0) == 0:
        return
    blocks = getattr(curvature, "blocks", None)
    if not isinstance(curvature, KroneckerFactored) or delta.shape != (len(blocks),):
        count = f"{len(blocks)} blocks" if blocks is not None else "no blocks"
        raise ValueError(
            f"prior_precision has shape {tuple(delta.shape)}; a per-layer prior needs a "
            f"Kronecker-factored curvature ('kfac', 'ekfac': one block per layer) and one "
            f"value per block (this curvature has {count})."
        )


def block_sizes(curvature: KroneckerFactored) -> list[int]:
    """Return the sizes ``n_b`` of the curvature's blocks (block order)."""
    return [block.shape[0] for block in curvature.blocks]


def block_squared_norms(mean: Array, curvature: KroneckerFactored) -> list[Array]:
    """Return ``m_b = ‖θ*_b‖²`` per block of a Kronecker-factored curvature."""
    in_blocks = mean[curvature.permutation]
    offsets = [0, *itertools.accumulate(block_sizes(curvature))]
    return [(in_blocks[start:stop] ** 2).sum() for start, stop in itertools.pairwise(offsets)]


def prior_terms(
    delta: Array, sizes: Sequence[int], squared_norms: Sequence[Array], xnp: Any
) -> tuple[Array, Array]:
    """Return ``Σ_b δ_b m_b`` and ``log det(prior) = Σ_b n_b log δ_b``.

    A scalar ``δ`` with one block (``sizes = [D]``, ``squared_norms = [‖θ*‖²]``) is the
    isotropic prior.
    """
    if getattr(delta, "ndim", 0) == 0:
        scatter = delta * squared_norms[0]
        return scatter, sizes[0] * xnp.log(delta + 0 * scatter)
    scatter, log_det = 0, 0
    for value, size, norm in zip(delta, sizes, squared_norms, strict=True):
        scatter = scatter + value * norm
        log_det = log_det + size * xnp.log(value)
    return scatter, log_det


def closed_form_gradient(
    spectra: Sequence[Array],
    delta: Array,
    scale: Array,
    sizes: Sequence[int],
    squared_norms: Sequence[Array],
    xnp: Any,
) -> tuple[Array, Array]:
    """Return ``∂E/∂ log δ`` (one per block for a per-block ``δ``) and ``Σ_i c λ_i/(c λ_i + δ)``.

    ``spectra``: ``H``'s eigenvalues per prior block (one group for a scalar ``δ``);
    ``scale``: ``c``. The second value is the curvature part of ``∂E/∂ log σ``.
    """
    per_block = getattr(delta, "ndim", 0) > 0
    deltas = delta if per_block else [delta]
    d_delta, d_sigma = [], 0
    for values, value, size, norm in zip(spectra, deltas, sizes, squared_norms, strict=True):
        denominators = scale * values + value
        d_delta.append(-0.5 * value * norm + 0.5 * size - 0.5 * (value / denominators).sum())
        d_sigma = d_sigma + (scale * values / denominators).sum()
    return (xnp.stack(d_delta) if per_block else d_delta[0]), d_sigma


def adam_descent(
    gradient: Callable[[list[Array]], list[Array]],
    variables: list[Array],
    tuned: Sequence[bool],
    steps: int,
    lr: float,
    progressbar: bool | None,
    xnp: Any,
) -> list[Array]:
    """Return ``variables`` after ``steps`` Adam steps on ``gradient`` (Kingma & Ba 2015).

    ``β = (0.9, 0.999)``, ``ε = 1e-8``; variables with ``tuned`` false are left as they
    are. ``progressbar``: ``None`` shows one on a terminal only.
    """
    first = [0 * v for v in variables]
    second = [0 * v for v in variables]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in trange(
        1,
        steps + 1,
        desc="marginal likelihood",
        disable=None if progressbar is None else not progressbar,
        leave=False,
    ):
        grads = gradient(variables)
        for i, grad in enumerate(grads):
            if not tuned[i]:
                continue
            first[i] = beta1 * first[i] + (1 - beta1) * grad
            second[i] = beta2 * second[i] + (1 - beta2) * grad**2
            corrected = first[i] / (1 - beta1**step)
            scale = xnp.sqrt(second[i] / (1 - beta2**step)) + eps
            variables[i] = variables[i] - lr * corrected / scale
    return variables
