"""Checks of the arguments the matrix-free algorithms share (budgets, tolerances, operators)."""

from __future__ import annotations

from cola.ops import LinearOperator

from cola_curvature.options import OnFailure, parse_option

#: What an iterative method does when it stops above its tolerance.


def _is_integer_at_least(value: object, minimum: int) -> bool:
    """Return whether ``value`` is an ``int`` (not a ``bool``) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_positive(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive integer."""
    if not _is_integer_at_least(value, 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_budget(method: str, num_matvecs: int, minimum: int) -> None:
    """Raise ``ValueError`` unless ``method`` gets an integer budget of at least ``minimum``."""
    if not _is_integer_at_least(num_matvecs, minimum):
        raise ValueError(
            f"{method} needs an integer num_matvecs >= {minimum}, got {num_matvecs!r}."
        )


def check_solver(tol: float, max_iters: int, on_failure: str) -> None:
    """Raise ``ValueError`` on a solver configuration that cannot run."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}.")
    check_positive("max_iters", max_iters)
    parse_option(OnFailure, on_failure, "on_failure")


def check_square(A: LinearOperator) -> None:
    """Raise ``ValueError`` unless ``A`` is a square CoLA operator."""
    if not isinstance(A, LinearOperator) or A.shape[0] != A.shape[1]:
        raise ValueError(f"expected a square CoLA LinearOperator, got {type(A).__name__}.")
