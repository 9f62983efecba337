"""KFAC statistics of ``nn.Linear`` and ``nn.Conv2d`` layers through module hooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import unfold

from cola_curvature.losses import Loss
from cola_curvature.options import FisherType, KFACApprox


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
    def in_features(self) -> int:
        """Return the dimension of the input factor ``A``: weight columns plus bias column."""
        weight = self.weight_columns if self.weight_index is not None else 0
        return weight + (self.bias_index is not None)


def kronecker_layers(model: nn.Module, params: Sequence[torch.Tensor]) -> list[KroneckerLayer]:
    """Return the supported layers that own entries of ``params``, in module order.

    Raises:
        ValueError: for a ``Conv2d`` with ``groups > 1`` or padding modes other than zeros.
    """
    index = {id(p): i for i, p in enumerate(params)}
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
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
    """Return the layer inputs as ``(N, T, in)``: ``T`` shared positions (sequence or patches)."""
    module = layer.module
    if isinstance(module, nn.Conv2d):
        patches = unfold(
            inputs,
            kernel_size=module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return patches.transpose(1, 2)
    return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])


def _layer_output_grads(layer: KroneckerLayer, grads: torch.Tensor) -> torch.Tensor:
    """Return gradients w.r.t. the layer output as ``(N, T, out)``."""
    if isinstance(layer.module, nn.Conv2d):
        return grads.flatten(start_dim=2).transpose(1, 2)
    return grads.reshape(grads.shape[0], -1, grads.shape[-1])


def _second_moment(x: torch.Tensor, approx: KFACApprox, reduce_op: str) -> torch.Tensor:
    """Return ``Σ_{n,t} x xᵀ`` (expand) or ``Σ_n x̄ x̄ᵀ`` with ``x̄ = op_t x`` (reduce)."""
    if approx is KFACApprox.REDUCE:
        x = x.mean(1) if reduce_op == "mean" else x.sum(1)
    else:
        x = x.reshape(-1, x.shape[-1])
    return x.T @ x


def _augment(a: torch.Tensor, layer: KroneckerLayer) -> torch.Tensor:
    """Return the block's input features ``ã``: ``[a, 1]``, ``a`` or ``[1]``.

    The weight contributes ``a`` when it is part of the curvature, the bias a constant 1.
    """
    if layer.weight_index is None:
        a = a[..., :0]
    if layer.bias_index is None:
        return a
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)


@dataclass
class BatchStatistics:
    """Unnormalised KFAC statistics of one batch, per layer name.

    ``input_moments[l] = Σ ã ãᵀ`` and ``output_moments[l] = R Σ g gᵀ`` (sums over examples,
    positions for expand, and backpropagated columns); ``positions[l]`` is ``T``.
    """

    input_moments: dict[str, torch.Tensor]
    output_moments: dict[str, torch.Tensor]
    positions: dict[str, int]


def output_cotangents(
    loss: Loss,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    fisher_type: FisherType,
    mc_samples: int,
    rng: object,
) -> torch.Tensor:
    """Return the vectors ``u_c`` to backpropagate, shape ``(C', *f.shape)``.

    type-2: the columns of the loss Hessian's symmetric factor (``Σ_c u_c u_cᵀ = H``);
    mc: ``mc_samples`` sampled output gradients scaled by ``1/√M`` (``E[Σ u uᵀ] = H``);
    empirical: the observed output gradient.
    """
    if fisher_type is FisherType.TYPE2:
        return loss.hessian_sqrt(outputs)
    if fisher_type is FisherType.MC:
        return loss.sampled_output_gradients(outputs, rng, mc_samples) / mc_samples**0.5
    return loss.output_gradient(outputs, targets)[None]


@dataclass
class LayerSignals:
    """Per layer: inputs ``ã`` as ``(N, T, in [+1])`` and output gradients ``(C', N, T, out)``.

    ``scale`` is the loss scaling ``R``; ``output_grads`` is ``None`` for forward-only.
    """

    inputs: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor] | None
    scale: float


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
    ``s`` at once (``C'`` backward passes batched by ``vmap``), giving
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
    grads = torch.autograd.grad(
        outputs, layer_outputs, cotangents, is_grads_batched=True, allow_unused=True
    )
    output_grads = {}
    for layer, grad, s in zip(layers, grads, layer_outputs, strict=True):
        if grad is None:
            grad = torch.zeros((cotangents.shape[0], *s.shape), dtype=s.dtype, device=s.device)
        output_grads[layer.name] = torch.stack(
            [_layer_output_grads(layer, column) for column in grad]
        )
    return LayerSignals(layer_inputs, output_grads, scale)


def batch_statistics(signals: LayerSignals, kfac_approx: KFACApprox) -> BatchStatistics:
    """Return one batch's ``Σ ã ãᵀ`` and ``R Σ g gᵀ`` per layer from its signals.

    With ``kfac_approx="reduce"`` the shared positions are averaged (inputs) or summed
    (output gradients) per example first (Eschenhagen et al., 2023).
    """
    input_moments = {
        name: _second_moment(a, kfac_approx, "mean") for name, a in signals.inputs.items()
    }
    positions = {name: a.shape[1] for name, a in signals.inputs.items()}
    output_moments = {}
    if signals.output_grads is not None:
        for name, g in signals.output_grads.items():
            moments = [_second_moment(column, kfac_approx, "sum") for column in g]
            output_moments[name] = signals.scale * torch.stack(moments).sum(0)
    return BatchStatistics(input_moments, output_moments, positions)


def batch_eigencorrections(
    signals: LayerSignals, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Return ``R Σ_{n,c} (Q_Gᵀ ∇W_{n,c} Q_A)²`` per layer, shape ``(out, in [+1])``.

    ``∇W_{n,c} = Σ_t g_{n,t,c} ã_{n,t}ᵀ`` is example ``n``'s gradient for column ``c``
    (true per-example gradients, positions summed) and ``(Q_G, Q_A)`` the eigenbases of the
    layer's Kronecker factors (George et al., 2018). Without shared positions (``T = 1``) the
    projected gradient is an outer product, ``(Q_Gᵀ g)(Q_Aᵀ ã)ᵀ``, so its square is the outer
    product of the squares: one ``(out × N C') · (N C' × in)`` product, never the
    ``(C', N, out, in)`` per-example gradients that ``T > 1`` needs.
    """
    corrections = {}
    for name, (q_out, q_in) in bases.items():
        a, g = signals.inputs[name], signals.output_grads[name]
        projected_a = a @ q_in
        projected_g = g @ q_out
        if a.shape[1] == 1:
            squares = torch.einsum("cno,ni->oi", projected_g[:, :, 0] ** 2, projected_a[:, 0] ** 2)
        else:
            per_example = torch.einsum("cnto,nti->cnoi", projected_g, projected_a)
            squares = (per_example**2).sum((0, 1))
        corrections[name] = signals.scale * squares
    return corrections
