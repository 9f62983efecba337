"""Autodiff backends, chosen by multiple dispatch on the type of the model."""

from __future__ import annotations

from collections.abc import Callable
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


#: The plum function the backends add their methods to (by the name ``curvature_backend``).
dispatched_backend = curvature_backend

#: Per argument types: the number of registered methods when resolved, and the method.
_RESOLVED: dict[tuple[type, ...], tuple[int, Callable[..., CurvatureBackend]]] = {}


def curvature_backend(model: Any, loss_func: Any, params: Any) -> CurvatureBackend:  # noqa: F811
    """Return the backend for ``model``: the method of :data:`dispatched_backend` for its types.

    Every registered signature is decided by the arguments' types alone (classes, unions of
    classes, ``Any``, and the optional-package stand-ins of ``backends/jax/adapters.py``,
    which an instance can only match once its package is imported), but plum counts the
    unions as unfaithful and so resolves every call anew (~0.1 gradient of a small MLP per
    operator built). The method is therefore kept per ``(type(model), type(loss_func),
    type(params))`` until a method is registered; a resolution that raises is not kept.
    """
    types = (type(model), type(loss_func), type(params))
    registered = len(dispatched_backend.methods)
    entry = _RESOLVED.get(types)
    if entry is None or entry[0] != registered:
        entry = _RESOLVED[types] = (registered, dispatched_backend.invoke(*types))
    return entry[1](model, loss_func, params)


__all__ = ["CurvatureBackend", "curvature_backend", "dispatch", "dispatched_backend"]
