"""Where a layer sits in a jaxpr: equation paths through nested calls, and :class:`Site`.

A :class:`Site` is one layer found by :mod:`~cola_curvature.backends.jax.jaxpr_layers`: the
path of its op and of its (biased) output, and the layout of its weight, input and output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn

from cola_curvature.backends.jax.jaxpr_embeddings import token_inputs
from cola_curvature.kfac_statistics.moments import TokenInputs
from cola_curvature.types import Array

Path = tuple[int, ...]

_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "call", "checkpoint", "remat"})


@dataclass
class Site:
    """One layer in a jaxpr: where its input is read and its output perturbed, and its layout.

    ``weight_positions[o, i]`` is the flat position in the weight leaf of the entry that
    multiplies input feature ``i`` into output feature ``o``; for a convolution, ``i`` runs
    over ``(in_channel, *filter)`` as :func:`jax.lax.conv_general_dilated_patches` orders
    its features; for an embedding (a ``V × d`` table ``W``, ``s = Wᵀ e_x``), ``o`` runs over
    ``d`` and ``i`` over the ``V`` rows. ``output_permutation`` (when the bias is added after
    ``transpose``s of the layer's output) gives, for each axis of the value at
    ``output_path``, the axis of the ``op_path`` output it came from. ``clip_indices``: the
    embedding's gather clamps out-of-range indices instead of dropping them.
    """

    kind: str
    weight: int
    weight_positions: np.ndarray
    op_path: Path
    output_path: Path
    activation: int
    out_axis: int
    output_aval: Any
    contracting: int = 0
    conv: dict[str, Any] = field(default_factory=dict)
    bias: int | None = None
    output_permutation: tuple[int, ...] | None = None
    clip_indices: bool = False

    def canonical_inputs(self, a: Array) -> Array | TokenInputs:
        """Return the layer input as ``(N, T, in)``: conv inputs as patches.

        An embedding's indices become :class:`TokenInputs` (no bias: ``_augment`` keeps them).
        """
        if self.kind == "embedding":
            num_classes = self.weight_positions.shape[1]
            return token_inputs(a, num_classes, self.clip_indices, self.output_aval.dtype)
        if self.kind == "dense":
            a = jnp.moveaxis(a, self.contracting, -1)
            return a.reshape(a.shape[0], -1, a.shape[-1])
        patches = jax.lax.conv_general_dilated_patches(a, **self.conv)
        return self._positions_last(patches, 0)

    def canonical_output_grads(self, g: Array) -> Array:
        """Return output gradients ``(C', *output.shape)`` as ``(C', N, T, out)``."""
        if self.output_permutation is not None:  # back to the op's output layout
            g = jnp.transpose(g, (0, *(1 + np.argsort(self.output_permutation))))
        if self.kind != "conv":
            g = jnp.moveaxis(g, 1 + self.out_axis, -1)
            return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
        return self._positions_last(g, 1)

    def _positions_last(self, x: Array, lead: int) -> Array:
        """Order a conv-output-layout array (after ``lead`` axes) as ``(..., N, T, features)``."""
        batch, feature, *spatial = self.conv["dimension_numbers"].out_spec
        order = [*range(lead), *(lead + d for d in (batch, *spatial, feature))]
        x = jnp.transpose(x, order)
        return x.reshape(*x.shape[: lead + 1], -1, x.shape[-1])


def _nested(eqn: JaxprEqn) -> tuple[Jaxpr, Sequence[Any]] | None:
    """Return the jaxpr (and its constants) that a call-like equation runs, else ``None``."""
    if eqn.primitive.name not in _CALLS:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, ClosedJaxpr):
        return inner.jaxpr, inner.consts
    if isinstance(inner, Jaxpr) and not inner.constvars:
        return inner, ()
    return None
