"""Output-space matrices of the Gauss-Newton-type curvatures, applied to ``J V``."""

from __future__ import annotations

from typing import Any

Array = Any


def per_example_outer_matmat(d: Array, jv: Array) -> Array:
    """Return ``d_n (d_nᵀ (J V)_n)`` for every example ``n`` and column.

    ``d`` has shape ``(N, ...)`` and ``jv`` shape ``(k, N, ...)``; the inner product runs
    over all non-batch axes of one example, so this applies the rank-one matrix
    ``d_n d_nᵀ`` of each example's whole output.
    """
    num_columns, num_examples = jv.shape[0], jv.shape[1]
    inner = (d[None] * jv).reshape(num_columns, num_examples, -1).sum(-1)
    return inner.reshape((num_columns, num_examples) + (1,) * (d.ndim - 1)) * d[None]
