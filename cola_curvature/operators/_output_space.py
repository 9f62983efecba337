"""Output-space matrices of the Gauss-Newton-type curvatures, applied to ``J V``."""

from __future__ import annotations

from typing import Any

Array = Any


def outer_product_matmat(d: Array, jv: Array) -> Array:
    """Return ``Σ_m d_{m,n} (d_{m,n}ᵀ (J V)_n)`` for every example ``n`` and column.

    ``d`` has shape ``(M, N, ...)`` (``M`` vectors per example) and ``jv`` shape
    ``(k, N, ...)``; inner products run over all non-batch axes of one example, so this
    applies the rank-``M`` matrix ``Σ_m d_{m,n} d_{m,n}ᵀ`` of each example's whole output.
    Cost and memory: ``O(M k N C)`` for ``C`` output entries per example.
    """
    num_vectors, num_columns, num_examples = d.shape[0], jv.shape[0], jv.shape[1]
    inner = (d[:, None] * jv[None]).reshape(num_vectors, num_columns, num_examples, -1).sum(-1)
    trailing = (1,) * (d.ndim - 2)
    weighted = inner.reshape((num_vectors, num_columns, num_examples) + trailing) * d[:, None]
    return weighted.sum(0)
