"""KFAC factors to and from laplace-torch's ``Kron`` (conventions: the package)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from cola_curvature.backends import curvature_backend
from cola_curvature.interop._layers import layer_groups, require
from cola_curvature.losses import MSE, CrossEntropy
from cola_curvature.operators._data import CurvatureData
from cola_curvature.operators.kfac import KFAC
from cola_curvature.operators.kronecker_blocks import DiagonalBlock, KroneckerBlock
from cola_curvature.operators.parameter_kronecker import ParameterKroneckerFactored
from cola_curvature.options import Reduction

#: ``s`` of the summed unit-variance negative log-likelihood ``s Σ_n ℓ_n`` of laplace-torch.
LAPLACE_NLL_SCALE = {MSE: 0.5, CrossEntropy: 1.0}


def to_laplace_kron(kfac: KFAC) -> Any:
    """Return laplace-torch's ``Kron`` of ``kfac``: ``H_laplace = (s / R) K``.

    One group per tensor of ``kfac``'s ``params``, in their order: ``[(√s/R) G, √s A]``
    for a weight, ``[(s/R) G]`` for a bias (see the module docstring for ``s`` and ``R``).
    ``KronLaplace`` takes it as ``H_facs`` (and its ``decompose()`` as ``H``) when its
    parameters are ``kfac``'s in the same order (laplace-torch uses
    ``model.parameters()``).

    Raises:
        TypeError: as :func:`to_curvlinops`, or the loss is neither MSE nor cross-entropy.
        ValueError: ``kfac`` was built with joint weight-bias blocks
            (``separate_weight_and_bias=False``), which laplace-torch cannot hold, or a
            block is not of a Linear / Conv2d layer.
    """
    kron_type = require("laplace.utils.matrix").Kron
    groups = layer_groups(kfac, "laplace-torch")
    if any("joint" in blocks for _, blocks in groups):
        raise ValueError(
            "laplace-torch's Kron has one group per parameter tensor; build the KFAC with "
            "separate_weight_and_bias=True (a joint weight-bias block has cross terms it "
            "cannot hold)."
        )
    nll_scale = _laplace_nll_scale(kfac._backend.loss)
    ratio = nll_scale / _loss_scale(kfac._backend, kfac._data.source, kfac.num_data)
    root = math.sqrt(nll_scale)
    kfacs: dict[int, list[torch.Tensor]] = {}
    for layer, blocks in groups:
        weight, bias = blocks["weight"], blocks["bias"]
        if weight is not None:
            factors = [ratio / root * weight.output_factor, root * weight.input_factor]
            kfacs[layer.weight_index] = factors
        if bias is not None:
            kfacs[layer.bias_index] = [ratio * bias.input_factor[0, 0] * bias.output_factor]
    return kron_type([kfacs[index] for index in sorted(kfacs)])


def from_laplace_kron(
    kron: Any,
    model: torch.nn.Module,
    loss_func: Any,
    params: Sequence[torch.Tensor],
    data: Iterable[tuple[Any, Any]],
    *,
    num_data: int | None = None,
    batch_size_fn: Any = None,
) -> ParameterKroneckerFactored:
    """Return our Kronecker-factored KFAC of ``loss_func`` from laplace-torch's ``Kron``.

    The inverse of :func:`to_laplace_kron`: ``K = (R / s) H_laplace``, group ``i`` on
    ``params[i]``: ``[F₀, F₁]`` becomes ``(R/√s) F₀ ⊗ F₁/√s`` on the tensor's row-major
    entries, ``[F]`` the block ``(R/s) F`` (a 1-d ``F`` a diagonal block). ``data`` (and
    ``num_data``) give ``R`` of a ``"mean"`` loss; a ``"sum"`` loss reads no data.

    Raises:
        TypeError: the loss is neither MSE nor cross-entropy.
        ValueError: the groups do not match ``params`` (count or sizes).
    """
    backend = curvature_backend(model, loss_func, params)
    nll_scale = _laplace_nll_scale(backend.loss)
    if len(kron.kfacs) != len(params):
        raise ValueError(
            f"kron has {len(kron.kfacs)} groups but params has {len(params)} tensors; "
            "laplace-torch's Kron holds one group per parameter tensor, in order."
        )
    if backend.loss.reduction is Reduction.SUM:
        scale = 1.0
    else:
        counted = CurvatureData(data, backend, num_data, batch_size_fn, False).num_data
        scale = _loss_scale(backend, data, counted)
    ratio = scale / nll_scale
    root = math.sqrt(nll_scale)
    blocks = []
    for index, (group, param) in enumerate(zip(kron.kfacs, params, strict=True)):
        size = math.prod(len(factor) for factor in group)
        if size != param.numel():
            raise ValueError(
                f"kron group {index} has {size} entries but params[{index}] has {param.numel()}."
            )
        blocks.append(_block_from_laplace_group(group, ratio, root))
    permutation = torch.arange(backend.num_params, device=blocks[0].device)
    return ParameterKroneckerFactored(backend, blocks, permutation)


def _block_from_laplace_group(group: Sequence[torch.Tensor], ratio: float, root: float) -> Any:
    """Return our block of one laplace-torch group scaled by ``R / s`` (see the module)."""
    if len(group) == 2:
        output_factor, input_factor = group
        return KroneckerBlock(ratio * root * output_factor, input_factor / root)
    (matrix,) = group
    if matrix.ndim == 1:
        return DiagonalBlock(ratio * matrix)
    return KroneckerBlock(ratio * matrix, matrix.new_ones((1, 1)))


def _laplace_nll_scale(loss: Any) -> float:
    """Return ``s`` of laplace-torch's summed NLL for ``loss`` (see the module docstring)."""
    scale = LAPLACE_NLL_SCALE.get(type(loss))
    if scale is None:
        raise TypeError(
            "laplace-torch's likelihoods are regression (MSELoss) and classification "
            f"(CrossEntropyLoss); the KFAC's loss is {type(loss).__name__}."
        )
    return scale


def _loss_scale(backend: Any, data: Iterable[tuple[Any, Any]], num_data: int) -> float:
    """Return ``R`` of ``L = R Σ_n ℓ_n``; a ``"mean"`` loss reads the first batch's output."""
    if backend.loss.reduction is Reduction.SUM:
        return 1.0
    with backend.preserved_state():
        outputs = backend.forward(next(iter(data))[0])
    return backend.loss.scale(outputs, num_data)
