"""Questions about scalars that may be JAX tracers (abstract values with no number yet)."""

from __future__ import annotations

from typing import Any


def is_traced(x: Any) -> bool:
    """Return whether ``x`` is an abstract value inside a JAX transformation (no values)."""
    return "Tracer" in type(x).__name__


def known_nonnegative(value: Any) -> bool | None:
    """Return whether a scalar is ``≥ 0``, or ``None`` when it is traced (no value yet)."""
    if is_traced(value):
        return None
    return bool(value >= 0)
