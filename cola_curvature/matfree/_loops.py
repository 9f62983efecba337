"""One loop driver for the iterative methods: Python loops eagerly, compiled loops under ``jit``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cola_curvature.types import Array

State = Any


def iterate(
    body: Callable[[Any, State], State],
    state: State,
    num_steps: int,
    xnp: Any,
    *,
    traced: bool,
    done: Callable[[State], Array] | None = None,
) -> tuple[Any, State]:
    """Run ``state = body(step, state)`` for ``step = 0, 1, …`` at most ``num_steps`` times.

    ``done(state)`` (a boolean scalar array), when given, is checked before each step and
    ends the loop once true. Eagerly (``traced=False``) this is a Python loop that exits on
    ``bool(done(state))``; traced (inside ``jax.jit``, where there is no value to branch
    on) it is ``xnp.for_loop`` without ``done`` (fixed depth, reverse-differentiable) and
    ``xnp.while_loop`` with it, the step limit and ``done`` both in the loop condition so
    that the compiled loop stops on the device. ``state`` is then a pytree of arrays whose
    shapes and dtypes ``body`` keeps.

    Returns:
        ``(steps, state)``: the number of steps run (an integer array when traced with
        ``done``) and the final state.

    """
    if num_steps == 0:  # a compiled loop would still trace its body once
        return 0, state
    if not traced:
        for step in range(num_steps):
            if done is not None and bool(done(state)):
                return step, state
            state = body(step, state)
        return num_steps, state
    if done is None:
        return num_steps, xnp.for_loop(0, num_steps, body, state)

    def condition(carry: tuple[Array, State]) -> Array:
        step, inner = carry
        return (step < num_steps) & ~done(inner)

    def step_once(carry: tuple[Array, State]) -> tuple[Array, State]:
        step, inner = carry
        return step + 1, body(step, inner)

    zero = xnp.array(0, dtype=xnp.int32, device=None)
    return xnp.while_loop(condition, step_once, (zero, state))
