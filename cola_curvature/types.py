"""The type aliases shared by every module: one array of any backend, a pytree, a batch."""

from __future__ import annotations

from typing import Any

#: An array of the backend at hand: a ``torch.Tensor`` or a ``jax.Array`` (CoLA's ``xnp``
#: works on both).
Array = Any
#: A JAX pytree (nested dicts, lists, tuples of arrays).
PyTree = Any
#: One ``(X, y)`` batch of inputs and targets.
Batch = tuple[Any, Any]
