"""The JAX backend; importing it registers ``model_fn(params, x)`` and flax/equinox modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cola_curvature.backends import curvature_backend, dispatch
from cola_curvature.backends.jax.backend import JaxBackend
from cola_curvature.losses import Loss


# precedence=-1: an ``nn.Module`` with a ``cc.losses`` object or ``None`` stays with torch
@dispatch(precedence=-1)
def curvature_backend(model: Callable, loss_func: Loss | None, params: Any) -> JaxBackend:  # noqa: F811
    """Return the JAX backend for a ``model_fn(params, x)``, loss a ``cc.losses`` object or None."""
    return JaxBackend(model, loss_func, params)


# registers the implicit differentiation of the matrix-free solvers for jax arrays
from cola_curvature.backends.jax import implicit  # noqa: E402, F401

# registers the flax linen, flax nnx and equinox module types (without importing those)
from cola_curvature.backends.jax.adapters import (  # noqa: E402
    from_equinox,
    from_flax_linen,
    from_flax_nnx,
)

__all__ = ["JaxBackend", "curvature_backend", "from_equinox", "from_flax_linen", "from_flax_nnx"]
