"""Thin adapters from flax (linen, nnx) and equinox modules to ``model_fn(params, x)``.

Each adapter returns ``(model_fn, params)`` for the JAX backend, and is registered with
:func:`~cola_curvature.backends.curvature_backend`, so that the operators take the module
directly (``cc.GGN(module, loss, params, data)``). What ``params`` means follows each
framework's own way of selecting parameters:

=============  ==========================================  ===================================
framework      ``params`` argument                         parameter pytree (flat order, ``@``)
=============  ==========================================  ===================================
flax linen     the variables ``module.init`` returned      ``variables["params"]``
flax nnx       a filter (``None`` = ``nnx.Param``)         ``nnx.state(module, filter)``
equinox        a filter spec (``None`` = inexact arrays)   ``eqx.filter(module, filter_spec)``
=============  ==========================================  ===================================

Everything the selection leaves out (linen's other collections such as ``batch_stats``,
nnx's other state, equinox's non-selected leaves) is held fixed at its value at
construction. Flat vectors follow ``jax.flatten_util.ravel_pytree`` of the parameter
pytree. flax and equinox are optional: this module imports neither, the dispatch rules
match their module types only once the user has imported them, and an adapter called
without its package raises an ``ImportError`` naming the extra to install.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import jax

from cola_curvature.backends import curvature_backend, dispatch
from cola_curvature.backends.jax.backend import JaxBackend
from cola_curvature.losses import Loss
from cola_curvature.types import PyTree

#: ``(params, inputs) -> outputs``: what every adapter returns next to ``params``.
ModelFn = Callable[[PyTree, Any], Any]


def _require(module: str, caller: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that names the extra to install."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{caller} needs {package}, an optional dependency that is not installed; "
            f"install it with: pip install 'cola-curvature[{package}]'."
        ) from error


class _OptionalClass(type):
    """Metaclass of a stand-in for a class of an optional package (no import needed).

    ``isinstance`` and ``issubclass`` look the class up in ``sys.modules`` at each check:
    an instance of it can only exist once its package was imported, so the stand-in is
    exact and the dispatch rule keyed on it never imports the package itself.
    """

    _module: str
    _name: str

    def _target(cls) -> type | None:
        """Return the real class, or ``None`` while its package is not imported."""
        module = sys.modules.get(cls._module)
        return None if module is None else getattr(module, cls._name, None)

    def __instancecheck__(cls, obj: Any) -> bool:
        target = cls._target()
        return target is not None and isinstance(obj, target)

    def __subclasscheck__(cls, subclass: type) -> bool:
        if isinstance(subclass, _OptionalClass):
            return subclass is cls
        target = cls._target()
        return target is not None and issubclass(subclass, target)


def _optional_class(module: str, name: str) -> type:
    """Return a stand-in for ``module.name`` (see :class:`_OptionalClass`)."""
    return _OptionalClass(name, (), {"_module": module, "_name": name})


#: ``flax.linen.Module``, ``flax.nnx.Module`` and ``equinox.Module`` without importing them.
LinenModule = _optional_class("flax.linen", "Module")
NnxModule = _optional_class("flax.nnx", "Module")
EquinoxModule = _optional_class("equinox", "Module")


def from_flax_linen(
    module: Any, variables: Mapping[str, PyTree], **apply_kwargs: Any
) -> tuple[ModelFn, PyTree]:
    """Return ``model_fn(params, x) = module.apply(variables | {"params": params}, x)``.

    The curvature is taken with respect to ``variables["params"]``; every other
    collection (e.g. ``batch_stats``) is held fixed, so batch norm must run on its running
    averages (``use_running_average=True``) and dropout must be off (pass e.g.
    ``deterministic=True`` through ``apply_kwargs``). The module acts on whole batches.

    Args:
        module: A ``flax.linen.Module``.
        variables: What ``module.init`` returned: a mapping with a ``"params"`` collection.
        **apply_kwargs: Keyword arguments for every ``module.apply`` call.

    Returns:
        ``model_fn`` and ``params = variables["params"]``.

    Raises:
        ImportError: flax is not installed (extra ``flax``).
        TypeError: ``variables`` is not a mapping with a ``"params"`` collection.
    """
    _require("flax.linen", "from_flax_linen")
    if not isinstance(variables, Mapping) or "params" not in variables:
        got = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise TypeError(
            "a flax linen module goes in with params = the variables module.init returned, "
            f"a mapping with a 'params' collection; got {got}."
        )
    fixed = {name: value for name, value in variables.items() if name != "params"}

    def model_fn(params: PyTree, x: Any) -> Any:
        return module.apply({**fixed, "params": params}, x, **apply_kwargs)

    return model_fn, variables["params"]


def from_flax_nnx(module: Any, filter: Any = None) -> tuple[ModelFn, PyTree]:
    """Return ``model_fn(params, x) = nnx.merge(graphdef, params, rest)(x)`` and ``params``.

    ``nnx.split(module, filter, ...)`` separates the parameters from the rest of the
    module's state (batch statistics, RNG counts), which is held fixed at its value now;
    the module itself is not changed. Call ``module.eval()`` first so that batch norm
    uses its running averages and dropout is off. The module acts on whole batches.

    Args:
        module: A ``flax.nnx.Module``.
        filter: An nnx filter selecting the parameters (``nnx.Param`` when ``None``),
            e.g. ``nnx.All(nnx.Param, nnx.PathContains("head"))`` for a subset.

    Returns:
        ``model_fn`` and ``params``, an ``nnx.State`` as ``nnx.state(module, filter)``.

    Raises:
        ImportError: flax is not installed (extra ``flax``).
        TypeError: ``filter`` is a state or mapping of values instead of a filter.
        ValueError: ``filter`` selects none of the module's state.
    """
    nnx = _require("flax.nnx", "from_flax_nnx")
    if isinstance(filter, (nnx.State, Mapping)):
        raise TypeError(
            "a flax nnx module goes in with params = an nnx filter such as nnx.Param (or None); "
            f"the values are read from the module. Got a {type(filter).__name__} of values."
        )
    selection = nnx.Param if filter is None else filter
    graphdef, params, rest = nnx.split(module, selection, ...)
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(f"the filter {selection!r} selects none of the module's state.")

    def model_fn(params: PyTree, x: Any) -> Any:
        return nnx.merge(graphdef, params, rest)(x)

    return model_fn, params


def from_equinox(
    module: Any, filter_spec: Any = None, *, batched: bool = False
) -> tuple[ModelFn, PyTree]:
    """Return ``model_fn(params, x) = jax.vmap(eqx.combine(params, static))(x)`` and ``params``.

    ``eqx.partition(module, filter_spec)`` gives the parameters (by default every inexact
    array leaf) and the static rest. Equinox modules act on one example, so the adapter
    maps the module over the leading axis of every input leaf with ``jax.vmap`` (outputs
    get the batch axis first); pass ``batched=True`` for a module that takes whole
    batches. Layers that need a key or a state (dropout, ``eqx.nn.BatchNorm``) must be
    in inference mode (``eqx.nn.inference_mode(module)``).

    Args:
        module: An ``equinox.Module``.
        filter_spec: As for ``eqx.partition``: a callable or a pytree of bools over the
            module (``eqx.is_inexact_array`` when ``None``).
        batched: Whether ``module`` takes a batch itself (no ``vmap``).

    Returns:
        ``model_fn`` and ``params = eqx.filter(module, filter_spec)``: the module with
        ``None`` in place of the fixed leaves.

    Raises:
        ImportError: equinox is not installed (extra ``equinox``).
        TypeError: ``filter_spec`` is not a filter (e.g. a pytree of parameter values).
    """
    eqx = _require("equinox", "from_equinox")
    spec = eqx.is_inexact_array if filter_spec is None else filter_spec
    try:
        params, static = eqx.partition(module, spec)
    except ValueError as error:
        raise TypeError(
            "an equinox module goes in with params = a filter spec as for eqx.partition "
            f"(a callable or a pytree of bools), or None; eqx.partition said: {error}"
        ) from error

    def model_fn(params: PyTree, x: Any) -> Any:
        model = eqx.combine(params, static)
        return model(x) if batched else jax.vmap(model)(x)

    return model_fn, params


@dispatch
def curvature_backend(model: LinenModule, loss_func: Loss | None, params: Any) -> JaxBackend:  # noqa: F811
    """Return the JAX backend for a flax linen module; ``params`` are its variables."""
    model_fn, parameters = from_flax_linen(model, params)
    return JaxBackend(model_fn, loss_func, parameters)


@dispatch
def curvature_backend(model: NnxModule, loss_func: Loss | None, params: Any) -> JaxBackend:  # noqa: F811
    """Return the JAX backend for a flax nnx module; ``params`` is an nnx filter or None."""
    model_fn, parameters = from_flax_nnx(model, params)
    return JaxBackend(model_fn, loss_func, parameters)


@dispatch
def curvature_backend(model: EquinoxModule, loss_func: Loss | None, params: Any) -> JaxBackend:  # noqa: F811
    """Return the JAX backend for an equinox module; ``params`` is a filter spec or None."""
    model_fn, parameters = from_equinox(model, params)
    return JaxBackend(model_fn, loss_func, parameters)
