"""KFAC layer discovery kept per model while nothing it depends on changed.

:func:`~cola_curvature.backends.torch.kfac.kronecker_layers` runs the model three times
(forward on one and on two copies of the first example, one backward), about one gradient
of a small model, so a KFAC rebuilt every optimizer step would pay it every step. Its result
depends on the parameters (which tensors, in which order, their shapes), on the code the
forward pass runs (the modules, their types, their settings and hooks) and on the structure
of the inputs (shapes after the example axis, dtypes); :func:`discovery_key` collects all of
them, and the layers are found again whenever it changes: a new or replaced module, a
swapped parameter, another ``params`` order, a flag such as ``training`` or a module's own
attribute, an added hook, another input shape. The statistics pass still checks every
layer's calls against the layers (``layer_signals``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

from cola_curvature.backends.torch.kfac import kronecker_layers
from cola_curvature.backends.torch.layer_calls import KroneckerLayer

_SCALARS = (bool, int, float, str, type(None))

#: Per model: the key its layers were found under, the layers and the uncovered reasons.
_DISCOVERED: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, list, dict[int, str]]] = (
    weakref.WeakKeyDictionary()
)


def _settings(module: nn.Module) -> tuple:
    """Return a module's own attributes that are scalars or tuples of scalars, and its hooks.

    These are what a forward pass branches on besides tensors (``training``, ``stride``,
    ``padding``, ``batch_first``, a user's flag); functions it holds (an activation, a
    replaced ``forward``) and its hooks are keyed by identity.
    """
    attributes = tuple(
        (name, value if isinstance(value, (*_SCALARS, tuple)) else id(value))
        for name, value in vars(module).items()
        if isinstance(value, _SCALARS)
        or (isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value))
        or (callable(value) and not isinstance(value, nn.Module))
    )
    hooks = tuple(
        tuple(map(id, getattr(module, name).values()))
        for name in ("_forward_hooks", "_forward_pre_hooks")
    )
    return attributes, hooks


def _input_structure(inputs: Any) -> tuple:
    """Return the inputs' pytree structure, and per leaf its shape after axis 0 and dtype.

    A non-tensor leaf is kept by value when hashable (an int option), else by type.
    """
    leaves, spec = _pytree.tree_flatten(inputs)
    described = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append((tuple(leaf.shape[1:]), leaf.dtype, leaf.device))
        elif isinstance(leaf, _SCALARS):
            described.append(leaf)
        else:
            described.append(type(leaf))
    return str(spec), tuple(described)


def discovery_key(
    model: nn.Module, params: Sequence[torch.Tensor], names: Sequence[str], inputs: Any
) -> Hashable:
    """Return everything the layers found on ``inputs`` depend on, as one hashable key.

    Every module under its every name (``named_modules`` with duplicates) by identity, type
    and :func:`_settings`; ``params`` by identity, name, shape, dtype and device; the
    model's parameters and buffers by name and identity; and :func:`_input_structure`.
    Cost ``O(#modules + #parameters)``, no model run.
    """
    modules = tuple(
        (name, id(module), type(module), _settings(module))
        for name, module in model.named_modules(remove_duplicate=False)
    )
    chosen = tuple(
        (id(p), name, tuple(p.shape), p.dtype, p.device)
        for p, name in zip(params, names, strict=True)
    )
    state = tuple((name, id(t)) for name, t in model.named_parameters(remove_duplicate=False))
    buffers = tuple((name, id(t)) for name, t in model.named_buffers(remove_duplicate=False))
    return modules, chosen, state, buffers, _input_structure(inputs)


def cached_kronecker_layers(
    model: nn.Module,
    model_fn: Callable[[], Callable[[Sequence[torch.Tensor], Any], torch.Tensor]],
    params: Sequence[torch.Tensor],
    names: Sequence[str],
    inputs: Any,
) -> tuple[list[KroneckerLayer], dict[int, str]]:
    """Return :func:`kronecker_layers` of ``model``, found again only when its key changed.

    ``model_fn()`` gives the functional model (built only when the layers are found). The
    last key and result are kept per model (a weak reference: nothing is kept alive); the
    layers are immutable and the lists are fresh copies.
    """
    key = discovery_key(model, params, names, inputs)
    entry = _DISCOVERED.get(model)
    if entry is None or entry[0] != key:
        layers, reasons = kronecker_layers(model_fn(), params, names, inputs)
        entry = _DISCOVERED[model] = (key, layers, reasons)
    return list(entry[1]), dict(entry[2])
