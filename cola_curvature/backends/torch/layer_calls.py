"""The recorded ``F.linear`` / ``F.conv2d`` / ``F.embedding`` calls and the Kronecker layers.

While the model runs, these three attributes of ``torch.nn.functional`` are wrapped by
recorders (restored on exit; not thread-safe), which keep each call's input and output; a
``TorchFunctionMode`` would not see the calls made inside
``F.multi_head_attention_forward``, which it receives as one call. A
:class:`KroneckerLayer` is what one such call on a parameter becomes, and the calls are
grouped by the parameter they are on.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F


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


def _layer_key(layer: KroneckerLayer) -> tuple[str, int]:
    """Return the key (:func:`_call_key`) of the layer's calls."""
    if layer.weight_index is not None:
        return "weight", layer.weight_index
    return "bias", layer.bias_index
