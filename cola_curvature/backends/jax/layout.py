"""The parameter layout of a JAX model: JAX arrays, and pytrees shaped like params."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cola_curvature.parameter_layout import ArrayKind, ParameterLayout


@jax.jit
def _finite(x: Any) -> Any:
    """Return whether ``x`` has no NaN or infinite entry: one compiled reduction, one dispatch."""
    return jnp.isfinite(x).all()


def _all_finite(x: Any) -> bool:
    """Return whether ``x`` has no NaN or infinite entry, evaluated eagerly (also in ``jit``)."""
    with jax.ensure_compile_time_eval():
        return bool(_finite(x))


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``fn`` jit-compiled with a static ``shapes`` argument where it has one.

    Cached per function: every layout of the process shares one program per parameter
    shapes (an operator rebuilt every training step compiles nothing new).
    """
    static = ("shapes",) if "shapes" in inspect.signature(fn).parameters else ()
    return jax.jit(fn, static_argnames=static)


#: JAX arrays (placed by JAX: the device is not checked).
ARRAYS = ArrayKind(
    types=(jax.Array,),
    name="jax.Array",
    conversion="jnp.asarray(...)",
    cast=lambda dtype, device: f"v.astype(jnp.{dtype})",
    checks_device=False,
    all_finite=_all_finite,
    compiled=_compiled,
)


class PyTreeOf:
    """Parameter-shaped input of a JAX model: a pytree with the parameters' structure."""

    description = "a pytree shaped like params"

    def __init__(self, treedef: Any) -> None:
        self.treedef = treedef

    def matches(self, v: Any) -> bool:
        """Return whether ``v`` is a pytree that is not itself an array."""
        return not hasattr(v, "shape")

    def leaves(self, v: Any, shapes: Sequence[tuple[int, ...]]) -> list[Any]:
        """Return the leaves of ``v`` after checking its structure and leaf shapes."""
        leaves, treedef = jax.tree_util.tree_flatten(v)
        got = [tuple(getattr(leaf, "shape", ())) for leaf in leaves]
        if treedef != self.treedef or got != list(shapes):
            raise ValueError(
                f"parameter-shaped input must be a pytree with the structure {self.treedef} "
                f"and leaf shapes {list(shapes)}, got {treedef} with leaf shapes {got}."
            )
        return leaves

    def build(self, leaves: Sequence[Any]) -> Any:
        """Return the pytree of the parameters' structure holding ``leaves``."""
        return self.treedef.unflatten(list(leaves))


def pytree_layout(
    names: Sequence[str], leaves: Sequence[Any], treedef: Any, device: Any
) -> ParameterLayout:
    """Return the layout of the parameter pytree ``treedef.unflatten(leaves)``."""
    return ParameterLayout(names, leaves, PyTreeOf(treedef), ARRAYS, device)
