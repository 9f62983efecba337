"""Questions about scalars that may be JAX tracers (abstract values with no number yet)."""

from __future__ import annotations

import math
from typing import Any


def is_traced(x: Any) -> bool:
    """Return whether ``x`` is an abstract value inside a JAX transformation (no values)."""
    return "Tracer" in type(x).__name__


def is_abstract(x: Any) -> bool:
    """Return whether ``x`` is a tracer Python cannot read a value from (inside ``jit``/``vmap``).

    Tracers of ``jax.grad`` or ``jax.jvp`` outside ``jit`` still carry values, so
    ``bool(...)`` works on them and iterative methods keep their Python loops there.
    """
    if not is_traced(x):
        return False
    from jax.errors import ConcretizationTypeError  # only reached with a tracer: JAX is there

    try:
        bool(x.reshape(-1)[:1].sum() == 0)
    except ConcretizationTypeError:
        return True
    return False


def known_nonnegative(value: Any) -> bool | None:
    """Return whether a scalar is ``≥ 0``, or ``None`` when it is traced (no value yet)."""
    if is_traced(value):
        return None
    return bool(value >= 0)


def finite_or_traced(value: Any) -> bool:
    """Return whether a scalar is finite, or traced (no value to check yet).

    A torch scalar that requires grad is read through ``detach()`` (reading it directly
    warns), so differentiable dampings and scales are checked silently.
    """
    if is_traced(value):
        return True
    return math.isfinite(scalar_value(value))


def scalar_value(value: Any) -> float:
    """Return a concrete scalar as a float, through ``detach()`` for a torch scalar with grad."""
    detach = getattr(value, "detach", None)
    return float(detach() if callable(detach) else value)
