"""Per-call KFAC signals of a torch layer: its inputs ``ã`` and its output gradients ``g``.

From one recorded call: the input as ``(N, T, in [+1])`` rows grouped by example (a conv2d
call's patches; an embedding's tokens and their weights), the gradients w.r.t. its output
as ``(C', N, T, out)``, and the gradient of ``[W b]`` through that call (``Σ_{n,t} g ãᵀ``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import pad

from cola_curvature.backends.torch.layer_calls import KroneckerLayer, LayerCall
from cola_curvature.kfac_statistics.moments import TokenInputs, _augment


def _input_rows(call: LayerCall) -> torch.Tensor:
    """Return the call's input as rows: ``(R, in)`` for linear, ``(R, 1)`` token indices."""
    inputs = call.inputs.detach()
    if call.kind == "embedding":
        return inputs.reshape(-1, 1)
    return inputs.reshape(-1, inputs.shape[-1])


def _call_gradient(
    layer: KroneckerLayer, call: LayerCall, output_grad: torch.Tensor
) -> torch.Tensor:
    """Return ``Σ_{n,t} g ãᵀ``, ``(out, in [+1])``: the gradient of ``[W b]`` through one call."""
    inputs = _layer_inputs(layer, call, 1)
    rows = _layer_output_grads(layer, output_grad[None], 1)[0].reshape(-1, layer.out_features)
    if isinstance(inputs, TokenInputs):
        weighted = rows * inputs.weights.reshape(-1, 1)
        return _segment_sum(weighted, inputs.indices.reshape(-1), inputs.num_classes).T
    return rows.T @ inputs.reshape(-1, inputs.shape[-1])


def _by_example(rows: torch.Tensor, layout: str, examples: int, axis: int = 0) -> torch.Tensor:
    """Return ``rows`` (``R`` along ``axis``) as ``(N, T)`` along ``axis, axis + 1``."""
    size = rows.shape[axis]
    if size % examples:
        raise ValueError(
            f"a layer call has {size} rows, not a multiple of the batch's {examples} examples."
        )
    before, after = rows.shape[:axis], rows.shape[axis + 1 :]
    if layout == "example-major":
        return rows.reshape(*before, examples, size // examples, *after)
    minor = rows.reshape(*before, size // examples, examples, *after)
    return minor.transpose(axis, axis + 1)


def _conv_padding(call: LayerCall, kernel: tuple[int, int]) -> tuple[int, int, int, int]:
    """Return the call's zero padding as ``(left, right, top, bottom)`` for ``F.pad``."""
    padding, dilation = (
        call.settings["padding"],
        torch.nn.modules.utils._pair(call.settings["dilation"]),
    )
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        (top, left) = (t // 2 for t in totals)
        return left, totals[1] - left, top, totals[0] - top
    p_h, p_w = torch.nn.modules.utils._pair(padding)
    return p_w, p_w, p_h, p_h


def _conv_patches(call: LayerCall, ones: bool = False) -> torch.Tensor:
    """Return a conv2d call's patches as ``(N, T, in [+1])``, ``T`` output pixels.

    The patches are copied once from a strided view of the padded input into feature-major
    memory ``(in [+1], N, T)`` (in ``unfold``'s column order ``(c, k_h, k_w)``), and returned
    as an ``(N, T, in [+1])`` view of it. With ``ones``, a last feature of ones (the bias's
    input) is written into the same buffer, so ``[a, 1]`` costs no second copy.
    """
    pair = torch.nn.modules.utils._pair
    k_h, k_w = call.weight.shape[2:]
    (d_h, d_w), (s_h, s_w) = pair(call.settings["dilation"]), pair(call.settings["stride"])
    padded = pad(call.inputs.detach(), _conv_padding(call, (k_h, k_w)))
    windows = padded.unfold(2, (k_h - 1) * d_h + 1, s_h).unfold(3, (k_w - 1) * d_w + 1, s_w)
    windows = windows[..., ::d_h, ::d_w].permute(1, 4, 5, 0, 2, 3)
    features = call.inputs.shape[1] * k_h * k_w
    n, positions = call.inputs.shape[0], windows.shape[4] * windows.shape[5]
    buffer = padded.new_empty((features + ones, n, positions))
    buffer[:features].view(windows.shape).copy_(windows)
    if ones:
        buffer[features:].fill_(1)
    return buffer.permute(1, 2, 0)


def _segment_sum(values: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    """Return ``(count, …)`` whose row ``k`` sums the rows of ``values`` with id ``k``."""
    totals = values.new_zeros((count, *values.shape[1:]))
    return totals.index_add_(0, ids, values)


def _layer_inputs(layer: KroneckerLayer, call: LayerCall, examples: int) -> Any:
    """Return the block's inputs ``ã`` as ``(N, T, in [+1])``, or an embedding's tokens."""
    if layer.kind == "conv2d" and layer.weight_index is not None:
        return _conv_patches(call, ones=layer.bias_index is not None)
    if layer.kind == "conv2d":
        return _augment(_conv_patches(call), layer)
    if layer.kind == "linear":
        return _augment(_by_example(_input_rows(call), layer.layout, examples), layer)
    tokens = _by_example(call.inputs.detach().reshape(-1), layer.layout, examples)
    padding_idx = layer.settings["padding_idx"]
    weights = torch.ones_like(tokens, dtype=call.output.dtype)
    if padding_idx is not None:
        weights = weights * (tokens != padding_idx % layer.weight_shape[0])
    return TokenInputs(tokens, weights, layer.weight_shape[0], _segment_sum)


def _layer_output_grads(layer: KroneckerLayer, grads: torch.Tensor, examples: int) -> torch.Tensor:
    """Return gradients w.r.t. the call output, ``(C', …)``, as ``(C', N, T, out)``."""
    if layer.kind == "conv2d":
        return grads.flatten(start_dim=3).transpose(2, 3)
    rows = grads.reshape(grads.shape[0], -1, grads.shape[-1])
    return _by_example(rows, layer.layout, examples, axis=1)
