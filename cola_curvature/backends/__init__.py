"""Autodiff backends, chosen by multiple dispatch on the type of the model."""

from __future__ import annotations

from typing import Any

from plum import Dispatcher

from cola_curvature.backends._protocol import CurvatureBackend

#: The dispatcher that backends register their model types with.
dispatch = Dispatcher()


@dispatch
def curvature_backend(model: object, loss_func: Any, params: Any) -> CurvatureBackend:
    """Return the backend for ``model``; backends register methods for their model types."""
    raise TypeError(
        f"No curvature backend for a model of type {type(model).__name__} with loss "
        f"{type(loss_func).__name__}; expected a torch.nn.Module (install the 'torch' extra), "
        "or a JAX model_fn(params, x) with a cola_curvature.losses object such as "
        "cc.losses.MSE() (install the 'jax' extra), or a flax or equinox module with such a "
        "loss (extras 'flax', 'equinox'); wrap a plain loss function as "
        "cc.losses.CallableLoss(fn, reduction=...)."
    )


__all__ = ["CurvatureBackend", "curvature_backend", "dispatch"]
