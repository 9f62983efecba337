"""Derivatives of an iterative linear solve by the implicit function theorem, for ``jax.jit``."""

from __future__ import annotations

from collections.abc import Callable

import jax
from plum import dispatch

from cola_curvature.types import Array


# a method of cola_curvature.matfree.solvers.implicit_solve (plum's global dispatcher joins
# methods by name, so the algorithms and this backend need not import each other)
@dispatch
def implicit_solve(B: jax.Array, matvec: Callable, solve: Callable) -> tuple[Array, dict]:
    """Return ``solve(B) = (X, info)`` with derivatives from ``A X = B`` rather than the loop.

    ``jax.lax.custom_linear_solve`` with ``A`` symmetric: ``dX = A⁻¹ (dB − dA X)``, and
    the transpose solve is the solve itself, so ``jax.grad`` of a jitted solve costs one
    more solve (the compiled ``while_loop`` of the solvers cannot be differentiated in
    reverse mode). ``matvec`` may close over traced parameters of ``A``.
    """
    return jax.lax.custom_linear_solve(
        matvec, B, lambda _, b: solve(b), symmetric=True, has_aux=True
    )
