"""How iterative methods report that they stopped short of their tolerance."""

from __future__ import annotations

import warnings


class ConvergenceWarning(UserWarning):
    """An iterative method stopped at its iteration limit above its tolerance."""


class ConvergenceError(RuntimeError):
    """An iterative method stopped above its tolerance, with ``on_failure="raise"``."""


def report_failure(message: str, on_failure: str) -> None:
    """Warn with :class:`ConvergenceWarning` or raise :class:`ConvergenceError`."""
    if on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=4)
