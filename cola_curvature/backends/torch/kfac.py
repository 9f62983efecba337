"""KFAC layers of a torch model: the ``linear``, ``conv2d`` and ``embedding`` calls on its weights.

A layer is found by the identity of its weight (or bias) in the calls the forward pass
makes through ``torch.nn.functional``: ``F.linear``, ``F.conv2d`` and ``F.embedding``,
which ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` and ``nn.MultiheadAttention`` (its
packed in-projection ``in_proj_weight`` and its ``out_proj``, called functionally inside
``F.multi_head_attention_forward``) all use; :mod:`~cola_curvature.backends.torch.layer_calls`
records them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils import _pytree

from cola_curvature.backends.torch.call_signals import (
    _call_gradient,
    _input_rows,
    _layer_inputs,
    _layer_output_grads,
)
from cola_curvature.backends.torch.layer_calls import (
    KroneckerLayer,
    LayerCall,
    _grouped,
    _layer_key,
    recorded_calls,
)
from cola_curvature.kfac_statistics.moments import LayerSignals, output_cotangents
from cola_curvature.kfac_statistics.shared_weights import (
    SharedWeightLayer,
    shared_weight_rejection,
    use_layers,
)
from cola_curvature.losses import Loss
from cola_curvature.options import FisherType


def _example_layout(one: LayerCall, two: LayerCall) -> str | None:
    """Return how the rows of a call are grouped by example, from runs on 1 and 2 examples.

    The two-example run repeats the example, so its rows are ``[R; R]`` (example-major) or
    ``R`` with every row twice (example-minor); ``None`` when neither, e.g. an output that
    all examples share (a position table called on ``arange(T)``).
    """
    if one.kind == "conv2d":
        batched = one.inputs.dim() == 4 and (one.inputs.shape[0], two.inputs.shape[0]) == (1, 2)
        return "example-major" if batched else None
    rows, doubled = _input_rows(one), _input_rows(two)
    if doubled.shape[0] != 2 * rows.shape[0]:
        return None
    if _same_rows(doubled, torch.cat([rows, rows])):
        return "example-major"
    if _same_rows(doubled, rows.repeat_interleave(2, dim=0)):
        return "example-minor"
    return None


def _same_rows(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Return whether two runs' rows agree: exactly (tokens), or to ``√ε`` of their largest entry.

    Batch sizes 1 and 2 may round differently (float32 kernels), hence the tolerance.
    """
    if not first.is_floating_point() or first.numel() == 0:
        return bool(torch.equal(first, second))
    tolerance = torch.finfo(first.dtype).eps ** 0.5 * first.abs().max()
    return bool((first - second).abs().max() <= tolerance)


def _rejection(call: LayerCall, layout: str | None) -> str | None:
    """Return why a call cannot be (a use of) a Kronecker layer, or ``None``."""
    settings = call.settings
    if call.kind == "conv2d" and settings["groups"] != 1:
        return f"a conv2d call with groups={settings['groups']} (KFAC needs groups=1)"
    if call.kind == "embedding" and (
        settings["max_norm"] is not None or settings["scale_grad_by_freq"]
    ):
        return "an embedding call with max_norm or scale_grad_by_freq"
    if layout is None:
        return (
            "its rows are not one per example and position (e.g. a table all examples "
            "share, like a position embedding called on arange(T))"
        )
    return None


def _repeated_first_example(inputs: Any, copies: int) -> Any:
    """Return the first example of a batch (every tensor's first row) ``copies`` times."""
    return _pytree.tree_map(
        lambda x: torch.cat([x[:1]] * copies) if isinstance(x, torch.Tensor) else x, inputs
    )


def _layer_name(names: Sequence[str], index: int, suffix: str) -> str:
    """Return a parameter's name without its ``.weight`` / ``.bias`` suffix (the module)."""
    name = names[index]
    return name[: -len(suffix)] if name.endswith(suffix) else name


def kronecker_layers(
    model_fn: Callable[[Sequence[torch.Tensor], Any], torch.Tensor],
    params: Sequence[torch.Tensor],
    names: Sequence[str],
    inputs: Any,
) -> tuple[list[KroneckerLayer], dict[int, str]]:
    """Return the Kronecker layers owning entries of ``params``, and why others are not.

    The model runs twice as for the statistics (with a graph: without one,
    ``nn.MultiheadAttention`` takes a fused path with no ``F.linear`` calls), on the first
    example of ``inputs`` and on two copies of it. Every recorded call on a parameter
    becomes a layer unless it is a grouped convolution or an embedding with ``max_norm`` /
    ``scale_grad_by_freq``, or its rows do not double with the examples in a known order
    (:func:`_example_layout`). A weight used by several calls (an lm-head tied to the
    token embedding, a layer applied twice) is one
    :class:`~cola_curvature.kfac_statistics.shared_weights.SharedWeightLayer` whose uses are
    the calls, when every call qualifies and they agree on the bias. The reasons are keyed
    by position in ``params``.
    """
    leaves = [p.detach().requires_grad_(True) for p in params]
    index = {id(leaf): i for i, leaf in enumerate(leaves)}
    runs, outputs = [], []
    for copies in (1, 2):
        with recorded_calls(index) as calls:
            outputs.append(model_fn(leaves, _repeated_first_example(inputs, copies)))
        runs.append(_grouped(calls, index))
    layers, reasons = [], {}
    for key, calls in runs[0].items():
        first = calls[0]
        weight_index = index.get(id(first.weight))
        bias_index = index.get(id(first.bias)) if first.bias is not None else None
        name = (
            _layer_name(names, weight_index, ".weight")
            if weight_index is not None
            else _layer_name(names, bias_index, ".bias")
        )
        uses, reason = _uses(name, calls, runs[1].get(key, []), index)
        if reason is None and len(uses) > 1:
            reason = shared_weight_rejection(uses)
        if reason is not None:
            reasons.update({i: reason for i in (weight_index, bias_index) if i is not None})
            continue
        layers.append(uses[0] if len(uses) == 1 else SharedWeightLayer(name, tuple(uses)))
    for layer in _used_outside_their_calls(layers, runs[0], outputs[0], leaves):
        reason = "also used outside its calls (e.g. x @ W.T): the calls' factors miss that use"
        reasons.update({i: reason for i in (layer.weight_index, layer.bias_index) if i is not None})
        layers.remove(layer)
    return layers, reasons


def _uses(
    name: str, calls: Sequence[LayerCall], doubled: Sequence[LayerCall], index: dict[int, int]
) -> tuple[list[KroneckerLayer], str | None]:
    """Return a layer per call on one weight (``name``), or why one of them cannot be one."""
    if len(doubled) != len(calls):
        return [], "its calls differ between runs on one and on two examples"
    uses = []
    for position, (call, twin) in enumerate(zip(calls, doubled, strict=True)):
        layout = _example_layout(call, twin)
        reason = _rejection(call, layout)
        if reason is not None:
            return [], reason if len(calls) == 1 else f"call {position} of {len(calls)}: {reason}"
        bias_index = index.get(id(call.bias)) if call.bias is not None else None
        use_name = name if len(calls) == 1 else f"{name}#{position}"
        weight_index = index.get(id(call.weight))
        shape = tuple(call.weight.shape)
        uses.append(
            KroneckerLayer(
                use_name,
                call.kind,
                shape,
                weight_index,
                bias_index,
                layout,
                call.settings,
                position,
                len(calls),
            )
        )
    return uses, None


def _used_outside_their_calls(
    layers: Sequence[Any],
    calls: dict[tuple, list[LayerCall]],
    outputs: torch.Tensor,
    leaves: Sequence[torch.Tensor],
) -> list[Any]:
    """Return the layers whose parameters the outputs also depend on outside their calls.

    For a random cotangent ``u`` (a private generator), the gradient of ``⟨u, f⟩`` w.r.t. a
    layer's ``[W b]`` equals ``Σ_{n,t} g ãᵀ`` summed over its calls (``g`` the gradient
    w.r.t. a call's output; a transposed use of a shared weight contributes the transpose)
    when the calls are their only uses; a weight also used as ``x @ W.T`` is not, and its
    KFAC block would miss that use. Agreement is to ``√ε`` of the dtype, relative to the
    gradient's largest entry.
    """
    if not layers:
        return []
    generator = torch.Generator(device=outputs.device).manual_seed(0)
    cotangent = torch.randn(
        outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device
    )
    uses = [use_layers([layer]) for layer in layers]
    layer_calls = [calls[_layer_key(use)][use.call_index] for group in uses for use in group]
    own = [
        [leaves[i] for i in (layer.weight_index, layer.bias_index) if i is not None]
        for layer in layers
    ]
    tensors = [call.output for call in layer_calls] + [leaf for group in own for leaf in group]
    grads = torch.autograd.grad(outputs, tensors, cotangent, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]
    output_grads = iter(zip(layer_calls, grads[: len(layer_calls)], strict=True))
    param_grads = iter(grads[len(layer_calls) :])
    tolerance = torch.finfo(outputs.dtype).eps ** 0.5
    shared = []
    for layer, group in zip(layers, uses, strict=True):
        through_calls = 0
        for use in group:
            gradient = _call_gradient(use, *next(output_grads))
            transposed = isinstance(layer, SharedWeightLayer) and layer.transposed(use)
            through_calls = through_calls + (gradient.T if transposed else gradient)
        columns = []
        if layer.weight_index is not None:
            columns.append(_block_grid(layer, next(param_grads)))
        if layer.bias_index is not None:
            columns.append(next(param_grads)[:, None])
        total = torch.cat(columns, dim=1)
        if (through_calls - total).abs().max() > tolerance * total.abs().max():
            shared.append(layer)
    return shared


def _block_grid(layer: KroneckerLayer | SharedWeightLayer, weight: torch.Tensor) -> torch.Tensor:
    """Return a weight-shaped tensor as the block's ``out × in`` grid: a view, no gather.

    The grid of :attr:`KroneckerLayer.weight_positions`: row-major ``(out, in·k·k)`` for
    ``linear`` and ``conv2d``, the transposed ``V × d`` table for an ``embedding``; a shared
    weight takes its reference use's.
    """
    grid = layer.reference if isinstance(layer, SharedWeightLayer) else layer
    if grid.kind == "embedding":
        return weight.reshape(-1, grid.out_features).T
    return weight.reshape(grid.out_features, -1)


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

    One forward pass records each layer's call (:func:`recorded_calls`): its input ``a``
    and output ``s``; the cotangents ``u_c`` of :func:`output_cotangents` are
    backpropagated to every ``s`` (one backward pass per column, see
    :func:`_backpropagate`), giving ``g_c = (∂f/∂s)ᵀ u_c``. The gradients are streamed
    (``LayerSignals.streamed``): each backward pass runs when the consumer asks for its
    column, so the signals are read once. Cost: one forward pass plus ``C'`` backward
    passes.

    Raises:
        ValueError: when a layer's weight is called more or less often than on the first
            batch, or a call differs from its layer (:func:`_checked_call`).
    """
    inputs, targets = batch
    leaves = [p.detach().requires_grad_(True) for p in params]
    index = {id(leaf): i for i, leaf in enumerate(leaves)}
    with recorded_calls(index) as calls:
        outputs = model_fn(leaves, inputs)
    grouped = _grouped(calls, index)
    captured = {}
    for layer in layers:
        layer_calls = grouped.get(_layer_key(layer), [])
        if len(layer_calls) != layer.calls:
            raise ValueError(
                f"layer {layer.name!r} ran {len(layer_calls)} times in one forward pass, "
                f"{layer.calls} on the first batch; KFAC needs the same calls on every batch."
            )
        captured[layer.name] = _checked_call(layer, layer_calls[layer.call_index], index)
    loss.check_target(outputs.detach(), targets)
    examples = outputs.shape[0]
    layer_inputs = {
        layer.name: _layer_inputs(layer, captured[layer.name], examples) for layer in layers
    }
    scale = loss.scale(outputs, num_data)
    if fisher_type is FisherType.FORWARD_ONLY:
        return LayerSignals(layer_inputs, None, scale)
    cotangents = output_cotangents(loss, outputs.detach(), targets, fisher_type, mc_samples, rng)
    streamed = _backpropagate(outputs, layers, captured, cotangents, examples)
    return LayerSignals(layer_inputs, None, scale, streamed)


def _checked_call(layer: KroneckerLayer, call: LayerCall, index: dict[int, int]) -> LayerCall:
    """Return ``call`` after checking it is the layer's: kind, weight shape, weight and bias.

    The layers were found on the first batch; a forward pass that branches on something
    else (a global flag, the data) and calls the layer differently on a later batch raises.
    """
    bias_index = index.get(id(call.bias)) if call.bias is not None else None
    found = (call.kind, tuple(call.weight.shape), index.get(id(call.weight)), bias_index)
    expected = (layer.kind, layer.weight_shape, layer.weight_index, layer.bias_index)
    if found != expected:
        raise ValueError(
            f"layer {layer.name!r} is a {found[0]} call with weight shape {found[1]} on "
            f"params {found[2:]} in this forward pass, but a {expected[0]} call with weight "
            f"shape {expected[1]} on params {expected[2:]} when the layers were found; KFAC "
            "needs the same calls on every batch."
        )
    return call


def _backpropagate(
    outputs: torch.Tensor,
    layers: Sequence[KroneckerLayer],
    captured: dict[str, LayerCall],
    cotangents: torch.Tensor,
    examples: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``(∂f/∂s)ᵀ u_c`` per layer, ``(1, N, T, out)``, one column ``u_c`` at a time.

    One backward pass per column, retaining the graph until the last: faster than one
    backward batched by ``vmap`` (``is_grads_batched``), whose ``threshold_backward`` and
    max-pool rules expand and concatenate (1.7x slower on the benchmark CNN). Each column
    is yielded as it is computed and released before the next backward pass, so a consumer
    that folds it into its statistics and drops it holds one column, never ``C'``. A layer
    the outputs do not depend on gets zeros.
    """
    layer_outputs = [captured[layer.name].output for layer in layers]
    for index, cotangent in enumerate(cotangents):
        retain = index < cotangents.shape[0] - 1
        grads = torch.autograd.grad(
            outputs, layer_outputs, cotangent, retain_graph=retain, allow_unused=True
        )
        yield {
            layer.name: _layer_output_grads(
                layer, (torch.zeros_like(s) if g is None else g)[None], examples
            )
            for layer, s, g in zip(layers, layer_outputs, grads, strict=True)
        }
        del grads
