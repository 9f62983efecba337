"""Drop-in optimizers on the library's curvature: torch ``Optimizer``s and an optax-style twin.

* :class:`SymmetryPreconditioned` (torch): ``(C + εI)^p g`` with ``C`` each weight's
  gradient outer product averaged over a weight-space symmetry group.
* :class:`KFAC` (torch): ``(K + λI)^{-1} g`` with KFAC's factors of the current batches.
* :func:`symmetry_preconditioned` (JAX): the first as an ``(init, update)`` pair, optax's
  ``GradientTransformation`` interface, without importing optax.

Each is imported on first access, so ``import cola_curvature`` imports neither torch nor
JAX for them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LOCATIONS = {
    "SymmetryPreconditioned": "cola_curvature.optim.symmetry_torch",
    "KFAC": "cola_curvature.optim.kfac_torch",
    "symmetry_preconditioned": "cola_curvature.optim.symmetry_jax",
    "GradientTransformation": "cola_curvature.optim.symmetry_jax",
    "SymmetryPreconditionedState": "cola_curvature.optim.symmetry_jax",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module (torch or JAX) on first access."""
    if name not in _LOCATIONS:
        raise AttributeError(f"module 'cola_curvature.optim' has no attribute {name!r}")
    return getattr(import_module(_LOCATIONS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = list(_LOCATIONS)
