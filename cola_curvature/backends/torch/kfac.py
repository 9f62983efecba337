"""KFAC layers of a torch model: the ``linear``, ``conv2d`` and ``embedding`` calls on its weights.

A layer is found by the identity of its weight (or bias) in the calls the forward pass
makes through ``torch.nn.functional``: ``F.linear``, ``F.conv2d`` and ``F.embedding``,
which ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` and ``nn.MultiheadAttention`` (its
packed in-projection ``in_proj_weight`` and its ``out_proj``, called functionally inside
``F.multi_head_attention_forward``) all use. While the model runs, these three attributes
of ``torch.nn.functional`` are wrapped by recorders (restored on exit; not thread-safe),
which keep each call's input and output; a ``TorchFunctionMode`` would not see the calls
made inside ``F.multi_head_attention_forward``, which it receives as one call.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.nn.functional import pad
from torch.utils import _pytree

from cola_curvature.kfac_statistics.moments import (
    LayerSignals,
    TokenInputs,
    _augment,
    output_cotangents,
)
from cola_curvature.kfac_statistics.shared_weights import (
    SharedWeightLayer,
    shared_weight_rejection,
    use_layers,
)
from cola_curvature.losses import Loss
from cola_curvature.options import FisherType


@dataclass(frozen=True)
class LayerCall:
    """One recorded call: its kind, input (an embedding's indices), output, weight and bias.

    ``kind`` is ``"linear"``, ``"conv2d"`` or ``"embedding"``; ``settings`` holds the
    call's other arguments by name (``stride``, ``padding``, ``padding_idx``, ...).
    """

    kind: str
    inputs: torch.Tensor
    output: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    settings: dict[str, Any]


#: The argument names of the recorded functions, in positional order, and their defaults.
_SIGNATURES = {
    "linear": ("input", "weight", "bias"),
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "embedding": (
        "input",
        "weight",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    ),
}
_DEFAULTS = {
    "bias": None,
    "stride": 1,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
    "padding_idx": None,
    "max_norm": None,
    "scale_grad_by_freq": False,
}


def _layer_call(kind: str, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> LayerCall:
    """Return the call of ``kind`` with its arguments bound by name."""
    bound = {**_DEFAULTS, **dict(zip(_SIGNATURES[kind], args, strict=False)), **kwargs}
    inputs, weight, bias = bound.pop("input"), bound.pop("weight"), bound.pop("bias")
    return LayerCall(kind, inputs, output, weight, bias, bound)


@contextmanager
def recorded_calls(tracked: Collection[int]) -> Iterator[list[LayerCall]]:
    """Record the ``F.linear`` / ``F.conv2d`` / ``F.embedding`` calls on tracked tensors.

    A call is recorded when its weight or bias is (by ``id``) one of ``tracked``; the list
    fills while the context is open.
    """
    calls: list[LayerCall] = []
    originals = {kind: getattr(F, kind) for kind in _SIGNATURES}

    def recorder(kind: str) -> Callable:
        original = originals[kind]

        def record(*args: Any, **kwargs: Any) -> torch.Tensor:
            output = original(*args, **kwargs)
            call = _layer_call(kind, args, kwargs, output)
            if id(call.weight) in tracked or (call.bias is not None and id(call.bias) in tracked):
                calls.append(call)
            return output

        return record

    try:
        for kind in _SIGNATURES:
            setattr(F, kind, recorder(kind))
        yield calls
    finally:
        for kind, original in originals.items():
            setattr(F, kind, original)


@dataclass(frozen=True)
class KroneckerLayer:
    """A weight (and bias) used in one call, sharing one Kronecker block ``G ⊗ A``.

    The block acts on an ``out × in`` matrix: the weight as an ``out × (in·k·k)`` matrix
    for ``linear`` and ``conv2d``; for ``embedding`` (weight ``V × d``, ``s = Wᵀ e_x``) its
    transpose ``Wᵀ`` with the one-hot ``e_x`` as input, so ``A`` is diagonal (the token
    counts). ``weight_index`` and ``bias_index`` are positions in the user's ``params``
    (``None`` when that parameter is not part of the curvature). ``layout`` says how the
    rows of the call's input are ordered: ``"example-major"`` (``n T + t``, e.g.
    ``(N, T, in)``) or ``"example-minor"`` (``t N + n``, e.g. the ``(T, N, E)`` inside
    ``nn.MultiheadAttention``). ``call_index`` says which of the ``calls`` calls on the
    weight in one forward pass this layer is (several for a tied or reused weight, each a
    use of a :class:`~cola_curvature.kfac_statistics.shared_weights.SharedWeightLayer`).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_index: int | None
    bias_index: int | None
    layout: str
    settings: dict[str, Any] = field(default_factory=dict, compare=False)
    call_index: int = 0
    calls: int = 1

    @property
    def out_features(self) -> int:
        """Return the dimension of the output factor ``G``."""
        return self.weight_shape[1 if self.kind == "embedding" else 0]

    @property
    def weight_columns(self) -> int:
        """Return the number of columns of the weight viewed as an ``out × in`` matrix."""
        if self.kind == "embedding":
            return self.weight_shape[0]
        return int(np.prod(self.weight_shape[1:]))

    @property
    def weight_positions(self) -> np.ndarray:
        """Return the flat position in the weight of block entry ``(o, i)``.

        Row-major for ``linear`` and ``conv2d``; an embedding's block is on ``Wᵀ``.
        """
        if self.kind == "embedding":
            return (
                np.arange(self.weight_columns * self.out_features).reshape(-1, self.out_features).T
            )
        return np.arange(self.out_features * self.weight_columns).reshape(self.out_features, -1)

    @property
    def in_features(self) -> int:
        """Return the dimension of the input factor ``A``: weight columns plus bias column."""
        weight = self.weight_columns if self.weight_index is not None else 0
        return weight + (self.bias_index is not None)


def _call_key(call: LayerCall, index: dict[int, int]) -> tuple[str, int]:
    """Return ``("weight", i)`` for a call on ``params[i]`` as weight, else ``("bias", j)``."""
    if id(call.weight) in index:
        return "weight", index[id(call.weight)]
    return "bias", index[id(call.bias)]


def _grouped(calls: Sequence[LayerCall], index: dict[int, int]) -> dict[tuple, list[LayerCall]]:
    """Return the calls per key (:func:`_call_key`), in order of first call."""
    grouped: dict[tuple, list[LayerCall]] = {}
    for call in calls:
        grouped.setdefault(_call_key(call, index), []).append(call)
    return grouped


def _input_rows(call: LayerCall) -> torch.Tensor:
    """Return the call's input as rows: ``(R, in)`` for linear, ``(R, 1)`` token indices."""
    inputs = call.inputs.detach()
    if call.kind == "embedding":
        return inputs.reshape(-1, 1)
    return inputs.reshape(-1, inputs.shape[-1])


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


def _layer_key(layer: KroneckerLayer) -> tuple[str, int]:
    """Return the key (:func:`_call_key`) of the layer's calls."""
    if layer.weight_index is not None:
        return "weight", layer.weight_index
    return "bias", layer.bias_index


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
            weight_grad = next(param_grads).reshape(-1)
            columns.append(weight_grad[torch.as_tensor(layer.weight_positions)])
        if layer.bias_index is not None:
            columns.append(next(param_grads)[:, None])
        total = torch.cat(columns, dim=1)
        if (through_calls - total).abs().max() > tolerance * total.abs().max():
            shared.append(layer)
    return shared


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


def _conv_patches(call: LayerCall) -> torch.Tensor:
    """Return a conv2d call's patches as ``(N, T, in)``, ``T`` output pixels.

    The patches are copied once from a strided view of the padded input into feature-major
    memory ``(in, N, T)`` (in ``unfold``'s column order ``(c, k_h, k_w)``), and returned as
    an ``(N, T, in)`` view of it.
    """
    pair = torch.nn.modules.utils._pair
    k_h, k_w = call.weight.shape[2:]
    (d_h, d_w), (s_h, s_w) = pair(call.settings["dilation"]), pair(call.settings["stride"])
    padded = pad(call.inputs.detach(), _conv_padding(call, (k_h, k_w)))
    windows = padded.unfold(2, (k_h - 1) * d_h + 1, s_h).unfold(3, (k_w - 1) * d_w + 1, s_w)
    windows = windows[..., ::d_h, ::d_w]
    n, positions = call.inputs.shape[0], windows.shape[2] * windows.shape[3]
    features = windows.permute(1, 4, 5, 0, 2, 3).reshape(-1, n, positions)
    return features.permute(1, 2, 0)


def _segment_sum(values: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    """Return ``(count, …)`` whose row ``k`` sums the rows of ``values`` with id ``k``."""
    totals = values.new_zeros((count, *values.shape[1:]))
    return totals.index_add_(0, ids, values)


def _layer_inputs(layer: KroneckerLayer, call: LayerCall, examples: int) -> Any:
    """Return the block's inputs ``ã`` as ``(N, T, in [+1])``, or an embedding's tokens."""
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
    :func:`_backpropagate`), giving ``g_c = (∂f/∂s)ᵀ u_c``. Cost: one forward pass plus
    ``C'`` backward passes.

    Raises:
        ValueError: when a layer's weight is called more or less often than on the first
            batch.
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
        captured[layer.name] = layer_calls[layer.call_index]
    loss.check_target(outputs.detach(), targets)
    examples = outputs.shape[0]
    layer_inputs = {
        layer.name: _layer_inputs(layer, captured[layer.name], examples) for layer in layers
    }
    scale = loss.scale(outputs, num_data)
    if fisher_type is FisherType.FORWARD_ONLY:
        return LayerSignals(layer_inputs, None, scale)
    cotangents = output_cotangents(loss, outputs.detach(), targets, fisher_type, mc_samples, rng)
    layer_outputs = [captured[layer.name].output for layer in layers]
    grads = _backpropagate(outputs, layer_outputs, cotangents)
    output_grads = {
        layer.name: _layer_output_grads(layer, grad, examples)
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
