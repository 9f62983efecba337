"""``A + λI`` for a matrix-free curvature operator, as its own type so the rules recognise it."""

from __future__ import annotations

import math
from typing import Any

from cola.annotations import PSD, SelfAdjoint
from cola.ops import LinearOperator

from cola_curvature._tracing import is_traced, known_nonnegative
from cola_curvature.matfree.solvers import IterativeInverse
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._interface import ParameterSpaceInterface

Array = Any


class ShiftedCurvature(ParameterSpaceInterface, LinearOperator):
    """The damped curvature ``c A + λ I``; ``A + λ * cola.ops.I_like(A)`` (either order) builds it.

    CoLA would build a ``Sum`` whose dispatch is order-sensitive; this type lets the
    matrix-free rules treat the damped operator as one symmetric operator (CG, MINRES,
    Lanczos and SLQ run on it directly) and shift exact parts (``tr(A + λI) = tr A + λD``,
    ``diag(A + λI) = diag A + λ``) without estimating them. The scale ``c`` (default 1)
    serves posterior precisions such as ``G / σ² + δ I``. ``PSD`` when ``A`` is PSD and
    ``c, λ ≥ 0``; otherwise ``SelfAdjoint``. ``c`` and ``λ`` may be differentiable scalars.

    Args:
        base: The matrix-free curvature operator ``A``.
        shift: ``λ`` (a float or a scalar array).
        scale: ``c`` (a float or a scalar array).

    """

    def __init__(self, base: CurvatureOperator, shift: Array, scale: Array = 1.0) -> None:
        for name, value in (("damping", shift), ("scale", scale)):
            if not is_traced(value) and not math.isfinite(float(value)):
                raise ValueError(f"the {name} of {base} must be a finite number, got {value}.")
        self.base = base
        self.shift = shift
        self.scale = scale
        self._backend = base._backend
        positive = base.isa(PSD) and known_nonnegative(shift) and known_nonnegative(scale)
        super().__init__(base.dtype, base.shape, annotations={PSD if positive else SelfAdjoint})

    def _matmat(self, X: Array) -> Array:
        return self.scale * self.base._matmat(X) + self.shift * X

    def damped(self, shift: Array) -> ShiftedCurvature:
        """Return ``c A + (λ + shift) I``."""
        return ShiftedCurvature(self.base, self.shift + shift, self.scale)

    def __str__(self) -> str:
        return f"({float(self.scale):g} {self.base} + {float(self.shift):g} I)"


#: The operators the matrix-free rules apply to.
MatrixFreeCurvature = CurvatureOperator | ShiftedCurvature


class CurvatureInverse(ParameterSpaceInterface, IterativeInverse):
    """:class:`~cola_curvature.matfree.solvers.IterativeInverse` of a curvature operator.

    Accepts the same input formats as the operator (``(D,)``, ``(D, k)``, parameter-shaped).
    """

    def __init__(self, A: MatrixFreeCurvature, alg: Any) -> None:
        self._backend = A._backend
        super().__init__(A, alg)
