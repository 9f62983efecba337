"""KFAC statistics of ``nn.Linear`` and ``nn.Conv2d`` layers through module hooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.functional import pad

from cola_curvature.losses import Loss
from cola_curvature.operators.kronecker_statistics import LayerSignals, _augment, output_cotangents
from cola_curvature.options import FisherType


@dataclass(frozen=True)
class KroneckerLayer:
    """A layer whose weight (and bias) share one Kronecker block ``G ⊗ A``.

    ``weight_index`` and ``bias_index`` are positions in the user's ``params`` (``None``
    when that parameter is not part of the curvature).
    """

    name: str
    module: nn.Module
    weight_index: int | None
    bias_index: int | None

    @property
    def out_features(self) -> int:
        """Return the dimension of the output factor ``G``."""
        return self.module.weight.shape[0]

    @property
    def weight_columns(self) -> int:
        """Return the number of columns of the weight viewed as an ``out × in`` matrix."""
        return self.module.weight[0].numel()

    @property
    def weight_positions(self) -> np.ndarray:
        """Return the flat position in the weight of block entry ``(o, i)``: row-major."""
        return np.arange(self.out_features * self.weight_columns).reshape(self.out_features, -1)

    @property
    def in_features(self) -> int:
        """Return the dimension of the input factor ``A``: weight columns plus bias column."""
        weight = self.weight_columns if self.weight_index is not None else 0
        return weight + (self.bias_index is not None)


def kronecker_layers(model: nn.Module, params: Sequence[torch.Tensor]) -> list[KroneckerLayer]:
    """Return the supported layers that own entries of ``params``, in module order.

    A layer whose weight is shared with another module (tied weights, e.g. an lm-head and
    the token embedding) is not a Kronecker layer: its Kronecker factors would describe
    one use of the tensor only. Its parameters are left uncovered (``uncovered="dense"``
    gives their exact block).

    Raises:
        ValueError: for a ``Conv2d`` with ``groups > 1`` or padding modes other than zeros.
    """
    index = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if owners[id(module.weight)] > 1:
            continue  # tied to another module (e.g. an lm-head sharing the embedding)
        weight_index = index.get(id(module.weight))
        bias_index = index.get(id(module.bias)) if module.bias is not None else None
        if weight_index is None and bias_index is None:
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise ValueError(
                f"KFAC supports Conv2d with groups=1 and padding_mode='zeros'; layer {name!r} "
                f"has groups={module.groups}, padding_mode={module.padding_mode!r}."
            )
        layers.append(KroneckerLayer(name, module, weight_index, bias_index))
    return layers


def _layer_inputs(layer: KroneckerLayer, inputs: torch.Tensor) -> torch.Tensor:
    """Return the layer inputs as ``(N, T, in)``: ``T`` shared positions (sequence or patches).

    A ``Conv2d``'s patches are copied once from a strided view of the padded input into
    feature-major memory ``(in, N, T)`` (in ``unfold``'s column order ``(c, k_h, k_w)``), and
    returned as an ``(N, T, in)`` view of it.
    """
    module = layer.module
    if isinstance(module, nn.Conv2d):
        padded = pad(inputs, module._reversed_padding_repeated_twice)
        (k_h, k_w), (d_h, d_w), (s_h, s_w) = module.kernel_size, module.dilation, module.stride
        windows = padded.unfold(2, (k_h - 1) * d_h + 1, s_h).unfold(3, (k_w - 1) * d_w + 1, s_w)
        windows = windows[..., ::d_h, ::d_w]
        n, positions = inputs.shape[0], windows.shape[2] * windows.shape[3]
        features = windows.permute(1, 4, 5, 0, 2, 3).reshape(-1, n, positions)
        return features.permute(1, 2, 0)
    return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])


def _layer_output_grads(layer: KroneckerLayer, grads: torch.Tensor) -> torch.Tensor:
    """Return gradients w.r.t. the layer output, ``(C', N, …)``, as a ``(C', N, T, out)`` view."""
    if isinstance(layer.module, nn.Conv2d):
        return grads.flatten(start_dim=3).transpose(2, 3)
    return grads.reshape(grads.shape[0], grads.shape[1], -1, grads.shape[-1])


def layer_signals(
    model_fn: Callable[[Sequence[torch.Tensor], object], torch.Tensor],
    params: Sequence[torch.Tensor],
    layers: Sequence[KroneckerLayer],
    batch: tuple[object, torch.Tensor],
    loss: Loss,
    num_data: int,
    fisher_type: FisherType,
    mc_samples: int,
    rng: object,
) -> LayerSignals:
    """Return every layer's inputs and backpropagated output gradients on one batch.

    One forward pass records each layer's input ``a`` and output ``s`` through forward
    hooks; the cotangents ``u_c`` of :func:`output_cotangents` are backpropagated to every
    ``s`` (one backward pass per column, see :func:`_backpropagate`), giving
    ``g_c = (∂f/∂s)ᵀ u_c``. Cost: one forward pass plus ``C'`` backward passes.

    Raises:
        ValueError: when a layer runs more than once in one forward pass.
    """
    inputs, targets = batch
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer in layers:
        captured[layer.name] = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured[name].append((args[0].detach(), output))

        return record

    handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in layers]
    leaves = [p.detach().requires_grad_(True) for p in params]
    try:
        outputs = model_fn(leaves, inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name, calls in captured.items():
        if len(calls) != 1:
            raise ValueError(
                f"layer {name!r} ran {len(calls)} times in one forward pass; KFAC needs each "
                "layer called once (share weights through a sequence dimension instead)."
            )
    loss.check_target(outputs.detach(), targets)
    layer_inputs = {
        layer.name: _augment(_layer_inputs(layer, captured[layer.name][0][0]), layer)
        for layer in layers
    }
    scale = loss.scale(outputs, num_data)
    if fisher_type is FisherType.FORWARD_ONLY:
        return LayerSignals(layer_inputs, None, scale)
    cotangents = output_cotangents(loss, outputs.detach(), targets, fisher_type, mc_samples, rng)
    layer_outputs = [captured[layer.name][0][1] for layer in layers]
    grads = _backpropagate(outputs, layer_outputs, cotangents)
    output_grads = {
        layer.name: _layer_output_grads(layer, grad)
        for layer, grad in zip(layers, grads, strict=True)
    }
    return LayerSignals(layer_inputs, output_grads, scale)


def _backpropagate(
    outputs: torch.Tensor, layer_outputs: Sequence[torch.Tensor], cotangents: torch.Tensor
) -> list[torch.Tensor]:
    """Return ``(∂f/∂s)ᵀ u_c`` for every layer output ``s``, stacked as ``(C', *s.shape)``.

    One backward pass per column ``u_c``, retaining the graph between them: faster than one
    backward batched by ``vmap`` (``is_grads_batched``), whose max-pool rule loops over the
    columns and concatenates. A single column is not copied. A layer the outputs do not
    depend on gets zeros.
    """
    columns = []
    for index, cotangent in enumerate(cotangents):
        retain = index < cotangents.shape[0] - 1
        columns.append(
            torch.autograd.grad(
                outputs, layer_outputs, cotangent, retain_graph=retain, allow_unused=True
            )
        )
    stacked = []
    for s, per_layer in zip(layer_outputs, zip(*columns, strict=True), strict=True):
        grads = [torch.zeros_like(s) if g is None else g for g in per_layer]
        stacked.append(grads[0][None] if len(grads) == 1 else torch.stack(grads))
    return stacked
