"""Seeded random numbers from explicit ``jax.random`` keys (JAX has no global RNG to guard)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from plum import dispatch

from cola_curvature.types import Array


class JaxRandom:
    """A :class:`~cola_curvature.losses.RandomSource` that splits its own ``jax.random`` key.

    Every draw splits the held key and consumes one half, so a source seeded once gives
    the same sequence of draws every time. It works eagerly and inside a traced function
    (built there from a traced key, it never leaves that trace).

    Args:
        key: A ``jax.random`` key.

    """

    def __init__(self, key: Array) -> None:
        self._key = key

    @classmethod
    def seeded(cls, seed: int) -> JaxRandom:
        """Return a source started from ``jax.random.key(seed)``."""
        return cls(jax.random.key(seed))

    def next_key(self) -> Array:
        """Return a fresh key for one draw and advance the held key."""
        self._key, key = jax.random.split(self._key)
        return key

    def uniform(self, shape: tuple[int, ...], like: Array) -> Array:
        """Return samples from U[0, 1) with the dtype of ``like``."""
        return jax.random.uniform(self.next_key(), shape, dtype=like.dtype)

    def normal(self, shape: tuple[int, ...], like: Array) -> Array:
        """Return samples from N(0, 1) with the dtype of ``like``."""
        return jax.random.normal(self.next_key(), shape, dtype=like.dtype)


# a method of cola_curvature.matfree._random.seeded_random_source (plum's global dispatcher
# joins methods by name, so the algorithms and this backend need not import each other)
@dispatch
def seeded_random_source(like: jax.Array, seed: Any) -> JaxRandom:
    """Return a :class:`JaxRandom` started from ``jax.random.key(seed)`` (also for tracers)."""
    return JaxRandom.seeded(seed)


@jax.tree_util.register_pytree_node_class
class JaxExampleRandom:
    """Random numbers keyed by each example's global index, from explicit ``jax.random`` keys.

    A draw has shape ``(M, N, *entry)`` (sample, example of the batch, entry; see
    :class:`~cola_curvature.losses.RandomSource`). Example ``n`` draws its ``(M, *entry)``
    numbers from ``fold_in(fold_in(key, draw), first_example + n)`` (``jax.vmap`` over the
    examples; ``draw`` counts this source's calls), so they depend on the seed and the
    example's global index only, never on the batch it is in. A pytree of ``key`` and
    ``first_example``: pass it into a jit-compiled function as an argument, and one
    program serves every batch offset.

    Args:
        key: A ``jax.random`` key.
        first_example: Global index of the batch's first example (an integer or a traced
            integer scalar).

    """

    def __init__(self, key: Array, first_example: Array | int) -> None:
        self._key = key
        self._first_example = first_example
        self._draws = 0

    @classmethod
    def seeded(cls, seed: int, first_example: int) -> JaxExampleRandom:
        """Return the source of ``jax.random.key(seed)`` for a batch from ``first_example``."""
        return cls(jax.random.key(seed), first_example)

    def tree_flatten(self) -> tuple[tuple[Array, Array | int], None]:
        """Return the leaves ``(key, first_example)`` (the draw count starts again at 0)."""
        return (self._key, self._first_example), None

    @classmethod
    def tree_unflatten(cls, aux: None, leaves: tuple[Array, Array | int]) -> JaxExampleRandom:
        """Return the source of ``leaves``."""
        return cls(*leaves)

    def _example_keys(self, num_examples: int) -> Array:
        """Return one key per example of the next draw, shape ``(num_examples,)``."""
        draw_key = jax.random.fold_in(self._key, self._draws)
        self._draws += 1
        indices = self._first_example + jnp.arange(num_examples)
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(draw_key, indices)

    def _draw(self, sampler: Any, shape: tuple[int, ...], like: Array) -> Array:
        """Return ``sampler(key_n, (M, *entry))`` for every example ``n``, as ``(M, N, *entry)``."""
        per_example = (shape[0],) + tuple(shape[2:])
        keys = self._example_keys(shape[1])
        draws = jax.vmap(lambda key: sampler(key, per_example, dtype=like.dtype))(keys)
        return jnp.moveaxis(draws, 0, 1)

    def uniform(self, shape: tuple[int, ...], like: Array) -> Array:
        """Return samples from U[0, 1) with the dtype of ``like``."""
        return self._draw(jax.random.uniform, shape, like)

    def normal(self, shape: tuple[int, ...], like: Array) -> Array:
        """Return samples from N(0, 1) with the dtype of ``like``."""
        return self._draw(jax.random.normal, shape, like)
