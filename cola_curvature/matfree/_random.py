"""Seeded random test vectors for a CoLA operator's backend, leaving global RNG state alone."""

from __future__ import annotations

from typing import Any

from cola.ops import LinearOperator

Array = Any


def random_source(A: LinearOperator, seed: int) -> Any:
    """Return a private random source (``normal``/``uniform``) for the backend of ``A``."""
    if A.xnp.__name__.endswith("torch_fns"):
        from cola_curvature.backends.torch.state import TorchRandom

        return TorchRandom(seed, A.device)
    from cola_curvature.backends.jax.state import JaxRandom

    return JaxRandom.seeded(seed)


def _like(A: LinearOperator) -> Array:
    """Return a one-entry array with the dtype and device of ``A``."""
    return A.xnp.zeros((1,), dtype=A.dtype, device=A.device)


def rademacher(A: LinearOperator, num_columns: int, seed: int) -> Array:
    """Return a ``(D, num_columns)`` matrix of independent ±1 entries."""
    uniform = random_source(A, seed).uniform((A.shape[1], num_columns), _like(A))
    ones = A.xnp.ones_like(uniform)
    return A.xnp.where(uniform < 0.5, -ones, ones)


def gaussian(A: LinearOperator, num_columns: int, seed: int) -> Array:
    """Return a ``(D, num_columns)`` matrix of independent standard normal entries."""
    return random_source(A, seed).normal((A.shape[1], num_columns), _like(A))
