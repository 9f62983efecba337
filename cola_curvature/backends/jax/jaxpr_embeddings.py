"""Embedding lookups in a jaxpr: a ``gather`` of whole rows of a 2-D parameter leaf.

``W[x]``, ``jnp.take(W, x, axis=0)``, ``W.at[x].get()`` and flax's ``nn.Embed`` all lower to
``gather(W, x[..., None])`` with ``offset_dims=(x.ndim,)``, ``collapsed_slice_dims=(0,)``,
``start_index_map=(0,)`` and ``slice_sizes=(1, d)``: the output ``(*x.shape, d)`` holds row
``x_{n,t}`` of the table ``W`` (``V × d``), ``s_{n,t} = Wᵀ e_{x_{n,t}}``, a dense layer on
``Wᵀ`` with one-hot inputs. Other gathers (columns, slices, the per-example lookup
``jax.vmap`` makes of ``W[i]``) are not recognised.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import JaxprEqn

from cola_curvature.kfac_statistics.moments import TokenInputs
from cola_curvature.types import Array


def gathers_rows(eqn: JaxprEqn) -> bool:
    """Return whether a ``gather`` reads one whole row of its 2-D operand per index.

    The indices need an example axis besides the index vector: ``(N, *T, 1)``.
    """
    operand, indices = (tuple(var.aval.shape) for var in eqn.invars)
    numbers = eqn.params["dimension_numbers"]
    return (
        len(operand) == 2
        and len(indices) >= 2
        and indices[-1] == 1
        and tuple(numbers.offset_dims) == (len(indices) - 1,)
        and tuple(numbers.collapsed_slice_dims) == (0,)
        and tuple(numbers.start_index_map) == (0,)
        and not numbers.operand_batching_dims
        and tuple(eqn.params["slice_sizes"]) == (1, operand[1])
    )


def clamps_indices(eqn: JaxprEqn) -> bool:
    """Return whether the ``gather`` clamps out-of-range indices into range (mode ``clip``)."""
    return eqn.params["mode"] == jax.lax.GatherScatterMode.CLIP


def token_inputs(indices: Array, num_classes: int, clip: bool, dtype: Any) -> TokenInputs:
    """Return a row gather's indices ``(N, *T, 1)`` as the tokens ``x`` ``(N, T)`` of ``e_x``.

    An index outside ``0 … V-1`` reads a clamped row when ``clip`` (its gradient goes to that
    row); otherwise it reads a fill value that has no gradient, and ``jax.ops.segment_sum``
    (which drops ids outside ``0 … V-1``) leaves it out of every statistic, as a padding
    index. So every weight is 1.
    """
    tokens = indices.reshape(indices.shape[0], -1)
    if clip:
        tokens = jnp.clip(tokens, 0, num_classes - 1)
    return TokenInputs(tokens, jnp.ones(tokens.shape, dtype), num_classes, jax.ops.segment_sum)
