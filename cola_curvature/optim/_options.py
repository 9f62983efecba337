"""Validation of the optimizers' hyperparameters, shared by the torch and JAX optimizers."""

from __future__ import annotations

import numbers
from enum import Enum
from typing import Any

from cola_curvature.options import SymmetryGroup, parse_option


class Grafting(str, Enum):
    """Whose step size a preconditioned direction takes, per parameter.

    Attributes:
        ADAM: the norm of the diagonal (Adam/RMSprop-like) step ``g ⊙ (v̂ + ε)^{-1/2}``.
        SGD: the norm of the gradient.
    """

    ADAM = "adam"
    SGD = "sgd"


def _check_number(value: Any, name: str) -> float:
    """Return ``value`` as a float, or raise ``TypeError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    return float(value)


def check_step_options(lr: Any, momentum: Any, weight_decay: Any, lr_name: str = "lr") -> None:
    """Raise unless ``lr ≥ 0`` (called ``lr_name``), ``0 ≤ momentum < 1``, ``weight_decay ≥ 0``."""
    if _check_number(lr, lr_name) < 0:
        raise ValueError(f"{lr_name} must be non-negative, got {lr!r}.")
    if not 0 <= _check_number(momentum, "momentum") < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if _check_number(weight_decay, "weight_decay") < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}.")


def check_curvature_options(beta: Any, damping: Any, update_interval: Any, power: Any) -> None:
    """Raise unless ``0 ≤ β < 1``, ``ε > 0``, ``update_interval ≥ 1`` and ``power ≤ 0``."""
    if not 0 <= _check_number(beta, "beta") < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}.")
    if not _check_number(damping, "damping") > 0:
        raise ValueError(f"damping must be positive, got {damping!r}.")
    if isinstance(update_interval, bool) or not isinstance(update_interval, numbers.Integral):
        raise TypeError(f"update_interval must be an int, got {type(update_interval).__name__}.")
    if update_interval < 1:
        raise ValueError(f"update_interval must be at least 1, got {update_interval!r}.")
    if _check_number(power, "power") > 0:
        raise ValueError(
            f"power must be non-positive (-1/2: Shampoo/Muon-like, -1: Newton-like), got {power!r}."
        )


def parse_group(group: Any) -> SymmetryGroup:
    """Return the :class:`SymmetryGroup` named by ``group`` (``ValueError`` lists the valid)."""
    return parse_option(SymmetryGroup, group, "symmetry group (groups)")


def parse_grafting(grafting: Any) -> Grafting | None:
    """Return the :class:`Grafting` named by ``grafting``, or ``None``."""
    return None if grafting is None else parse_option(Grafting, grafting, "grafting")
