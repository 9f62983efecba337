"""Seeded random test vectors for a CoLA operator's backend, leaving global RNG state alone.

The random source is chosen by multiple dispatch on the array type: the generic
:func:`seeded_random_source` is declared here, and each backend registers the method for
its arrays (``torch.Tensor`` in ``backends/torch/state.py``, ``jax.Array`` in
``backends/jax/state.py``) with plum's global dispatcher, which joins methods by function
name (as :mod:`dispatch_rules` extend ``cola.linalg``). So this module imports no backend,
and no backend imports it.
"""

from __future__ import annotations

from typing import Any

from cola.ops import LinearOperator
from plum import dispatch

from cola_curvature.types import Array


@dispatch
def seeded_random_source(like: object, seed: Any) -> Any:
    """Return a private random source (``normal``/``uniform``) for arrays like ``like``.

    Backends register the methods for their array types; this one is reached for any
    other type.

    Raises:
        TypeError: for an array type no backend registered a random source for.

    """
    raise TypeError(
        f"no seeded random source for arrays of type {type(like).__name__}; the torch and "
        "JAX backends register one for torch.Tensor and jax.Array when imported "
        "(import cola_curvature with the 'torch' or 'jax' extra installed)."
    )


def _like(A: LinearOperator) -> Array:
    """Return a one-entry array with the dtype and device of ``A``."""
    return A.xnp.zeros((1,), dtype=A.dtype, device=A.device)


def random_source(A: LinearOperator, seed: int) -> Any:
    """Return a private random source (``normal``/``uniform``) for the backend of ``A``."""
    return seeded_random_source(_like(A), seed)


def rademacher(A: LinearOperator, num_columns: int, seed: int) -> Array:
    """Return a ``(D, num_columns)`` matrix of independent ±1 entries."""
    uniform = random_source(A, seed).uniform((A.shape[1], num_columns), _like(A))
    ones = A.xnp.ones_like(uniform)
    return A.xnp.where(uniform < 0.5, -ones, ones)


def gaussian(A: LinearOperator, num_columns: int, seed: int) -> Array:
    """Return a ``(D, num_columns)`` matrix of independent standard normal entries."""
    return random_source(A, seed).normal((A.shape[1], num_columns), _like(A))
