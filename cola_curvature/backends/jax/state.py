"""Seeded random numbers from explicit ``jax.random`` keys (JAX has no global RNG to guard)."""

from __future__ import annotations

from typing import Any

import jax

Array = Any


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
