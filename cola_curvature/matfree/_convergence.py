"""How iterative methods report that they stopped short of their tolerance.

Eagerly, a :class:`ConvergenceWarning` or :class:`ConvergenceError` at once. Inside
``jax.jit`` there is no value to test when Python runs, so :func:`report_failure_traced`
puts the test into the compiled function (``jax.debug.callback``): the warning comes at
run time, and ``on_failure="raise"``, which cannot leave compiled code as an exception,
is the caller's to turn into NaN results.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from cola_curvature.options import OnFailure
from cola_curvature.types import Array


class ConvergenceWarning(UserWarning):
    """An iterative method stopped at its iteration limit above its tolerance."""


class ConvergenceError(RuntimeError):
    """An iterative method stopped above its tolerance, with ``on_failure="raise"``."""


def report_failure(message: str, on_failure: str) -> None:
    """Warn with :class:`ConvergenceWarning` or raise :class:`ConvergenceError`."""
    if on_failure == OnFailure.RAISE:
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=4)


def report_failure_traced(failed: Array, describe: Callable[..., str], *values: Array) -> None:
    """Warn with :class:`ConvergenceWarning` when the compiled function runs and ``failed`` holds.

    ``describe(*values)`` builds the message from the run-time ``values`` (as NumPy
    arrays). Only called with JAX tracers, so JAX is installed.
    """
    import jax

    def callback(failed_now: Any, *values_now: Any) -> None:
        if bool(failed_now):
            warnings.warn(describe(*values_now), ConvergenceWarning, stacklevel=2)

    jax.debug.callback(callback, failed, *values)
