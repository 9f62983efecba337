"""The block permutation of a Kronecker-factored operator: block order to the user's order."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

from cola_curvature._tracing import is_traced
from cola_curvature.kfac_statistics.shared_weights import SharedWeightLayer
from cola_curvature.types import Array

#: Block permutations of at most this many entries are kept for the next build on the same
#: layout (:func:`cached_permutations`): two ``int64`` arrays of ``2²¹`` entries are 32 MiB.
CACHED_PERMUTATION_ENTRIES = 2**21

#: How many layouts' permutations are kept (least recently used dropped first).
CACHED_PERMUTATION_LAYOUTS = 2

_PERMUTATIONS: OrderedDict[Hashable, tuple[Array, Array]] = OrderedDict()
_PERMUTATIONS_LOCK = threading.Lock()


def block_permutation(
    layer: Any, offsets: Sequence[int], separated: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """Return the user-order positions of the entries of ``vec([W b])`` (row-major).

    Entry ``(o, i)`` of the augmented ``out × in`` matrix is the weight entry at flat
    position ``layer.weight_positions[o, i]`` of the weight parameter (row-major ``(out, in)``
    for torch, the transpose for a JAX ``(in, out)`` kernel) for ``i`` below the weight's
    column count, and bias entry ``o`` in the last column. ``separated``: the order of two
    blocks instead, ``vec(W)`` then ``b``. Written into ``out`` (``out · in`` integers) when
    given, with no temporary of that size. Index bookkeeping stays in NumPy (one conversion
    per operator, not one small device computation per layer).
    """
    rows, columns = layer.out_features, layer.in_features
    out = np.empty(rows * columns, dtype=np.int64) if out is None else out
    bias = layer.bias_index is not None
    if separated:
        weight_part = out[: rows * (columns - 1)].reshape(rows, columns - 1)
        bias_part = out[rows * (columns - 1) :]
    else:
        grid = out.reshape(rows, columns)
        weight_part, bias_part = grid[:, : columns - bias], grid[:, -1]
    if layer.weight_index is not None:
        np.add(layer.weight_positions, offsets[layer.weight_index], out=weight_part)
    if bias:
        np.add(np.arange(rows), offsets[layer.bias_index], out=bias_part)
    return out


def grid_key(layer: Any) -> Hashable:
    """Return a hashable key that equals another layer's exactly when their block grids do.

    The grid is ``out_features``, ``in_features``, ``weight_positions``, ``weight_index``
    and ``bias_index``. A layer whose ``weight_positions`` is a property computes it from
    its compared fields (a torch ``KroneckerLayer`` from its kind and weight shape), so the
    layer itself is the key; one that stores the array (a JAX layer) adds its bytes; a
    shared weight is keyed by its uses.
    """
    if isinstance(layer, SharedWeightLayer):
        return layer.name, tuple(grid_key(use) for use in layer.uses)
    if isinstance(getattr(type(layer), "weight_positions", None), property):
        return layer
    return layer, np.asarray(layer.weight_positions).tobytes()


def cached_permutations(
    key: Hashable, build: Callable[[], tuple[Array, Array]]
) -> tuple[Array, Array]:
    """Return ``build()``'s ``(permutation, inverse)``, reused while ``key`` stays cached.

    KFAC rebuilt on an unchanged layout (every optimizer step) gets the same two immutable
    index arrays instead of writing ``2 D`` integers again (the allocation and page faults
    cost about one gradient on a 269k-parameter MLP). ``key`` must fix every entry: the
    layers' grids (:func:`grid_key`), which of them are split, the uncovered parameters, the
    layout's sizes and offsets, and the array library and device. At most
    ``CACHED_PERMUTATION_LAYOUTS`` layouts of at most ``CACHED_PERMUTATION_ENTRIES`` entries
    are kept, so the memory held after the operators are gone is bounded (64 MiB);
    thread-safe (two threads may both write a missing layout; either result is kept). Arrays
    made inside a JAX trace (``jit``) are tracers of that trace and are never kept.
    """
    with _PERMUTATIONS_LOCK:
        cached = _PERMUTATIONS.get(key)
        if cached is not None:
            _PERMUTATIONS.move_to_end(key)
            return cached
    permutations = build()
    if permutations[0].shape[0] <= CACHED_PERMUTATION_ENTRIES and not is_traced(permutations[0]):
        with _PERMUTATIONS_LOCK:
            _PERMUTATIONS[key] = permutations
            while len(_PERMUTATIONS) > CACHED_PERMUTATION_LAYOUTS:
                _PERMUTATIONS.popitem(last=False)
    return permutations
