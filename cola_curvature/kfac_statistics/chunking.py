"""How many per-example cotangent gradients to hold at once: the exact diagonal's memory plan.

The exact curvature diagonal ``R Σ_{n,c} (J_nᵀ u_{n,c})²`` needs one ``D``-vector per example
``n`` and cotangent column ``c``: ``N · C' · D`` numbers for a batch, where a language model's
type-2 ``C'`` is vocabulary × context. The sum of squares is taken chunk by chunk instead,
``columns × examples`` gradients at a time, so that a chunk holds at most
:data:`PER_EXAMPLE_GRADIENT_BYTES`; ``vmap``'s intermediates shrink with it. Each gradient is
still computed once; only the number of ``vmap`` calls grows. Measured on a one-layer GPT
(vocabulary 32, context 16, ``D`` = 14 304, 8 windows, float64: ``C'`` = 512, 469 MB of
gradients): peak memory growth 1533 MiB unchunked, 433 MiB with this budget, time 4.1 vs 3.2 s.
"""

from __future__ import annotations

from typing import NamedTuple

#: Most bytes of per-example gradients held at once by the exact diagonal (64 MiB).
PER_EXAMPLE_GRADIENT_BYTES = 2**26


class GradientChunks(NamedTuple):
    """Cotangent columns and examples per chunk of the per-example gradients."""

    columns: int
    examples: int


def gradient_chunks(
    num_columns: int, num_examples: int, dimension: int, itemsize: int
) -> GradientChunks:
    """Return the largest chunk of ``(columns, examples)`` whose gradients fit the budget.

    Whole batches of examples first (one ``vmap`` over all examples, as many columns as fit);
    only when a single column of the batch exceeds :data:`PER_EXAMPLE_GRADIENT_BYTES` are the
    examples split too, one column at a time. Never below one gradient per chunk.
    """
    gradient_bytes = max(1, dimension * itemsize)
    columns = PER_EXAMPLE_GRADIENT_BYTES // (num_examples * gradient_bytes)
    if columns >= 1:
        return GradientChunks(min(columns, num_columns), num_examples)
    examples = PER_EXAMPLE_GRADIENT_BYTES // gradient_bytes
    return GradientChunks(1, max(1, min(examples, num_examples)))
