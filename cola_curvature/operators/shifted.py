"""Damped sums of curvature operators (``c A + λI``, ``Σ_i c_i A_i + λI``), as their own types.

CoLA would build a ``Sum`` (or a ``Product`` with a ``ScalarMul``) whose rules densify
(Cholesky, dense ``eigh``) or fall back to CoLA's CG; these types let the matrix-free
rules of this library treat the combination as one symmetric operator.
"""

from __future__ import annotations

from collections.abc import Sequence

from cola.annotations import PSD, SelfAdjoint
from cola.ops import LinearOperator

from cola_curvature._tracing import finite_or_traced, known_nonnegative
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._interface import ParameterSpaceInterface
from cola_curvature.types import Array


class ShiftedCurvature(ParameterSpaceInterface, LinearOperator):
    """The damped curvature ``c A + λ I``; ``A + λ * cola.ops.I_like(A)`` (either order) builds it.

    CoLA would build a ``Sum`` whose dispatch is order-sensitive; this type lets the
    matrix-free rules treat the damped operator as one symmetric operator (CG, MINRES,
    Lanczos and SLQ run on it directly) and shift exact parts (``tr(A + λI) = tr A + λD``,
    ``diag(A + λI) = diag A + λ``) without estimating them. The scale ``c`` (default 1)
    serves posterior precisions such as ``G / σ² + δ I``; ``cola.linalg.logdet`` of it
    re-weights one quadrature rule of ``A`` kept on ``A`` (nodes ``c θ + δ``), so a family
    of ``(c, λ)`` costs the products of one. ``PSD`` when ``A`` is PSD and
    ``c, λ ≥ 0``; otherwise ``SelfAdjoint``. ``c`` and ``λ`` may be differentiable scalars.

    Args:
        base: The matrix-free curvature operator ``A``.
        shift: ``λ`` (a float or a scalar array).
        scale: ``c`` (a float or a scalar array).

    """

    def __init__(self, base: CurvatureOperator, shift: Array, scale: Array = 1.0) -> None:
        for name, value in (("damping", shift), ("scale", scale)):
            if not finite_or_traced(value):
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

    def scaled(self, factor: Array) -> ShiftedCurvature:
        """Return ``factor (c A + λ I) = (factor c) A + (factor λ) I``."""
        return ShiftedCurvature(self.base, factor * self.shift, factor * self.scale)

    def __str__(self) -> str:
        return f"({float(self.scale):g} {self.base} + {float(self.shift):g} I)"


class CurvatureSum(ParameterSpaceInterface, LinearOperator):
    """``Σ_i c_i A_i + λ I`` over one model's parameters, kept matrix-free.

    ``G + K``, ``2 G + λI``, ``K₁ + K₂ + λI`` (any curvature operators of this library
    over the same parameters: matrix-free, Kronecker-factored, diagonal) build it through
    ``+`` and ``*``. A product costs one product with each term. The matrix-free rules
    apply: ``inv`` by CG (``PSD``) or MINRES, ``logdet`` by SLQ, ``eig`` by Lanczos,
    ``sqrt``/``isqrt`` by Lanczos; ``trace`` and ``diag`` add the terms' own results (exact
    for structured terms, estimated for matrix-free ones). ``PSD`` when every term is
    ``PSD`` and every ``c_i, λ ≥ 0``; otherwise ``SelfAdjoint``.

    Args:
        terms: Pairs ``(c_i, A_i)``.
        shift: ``λ``.

    Raises:
        ValueError: when the terms act on spaces of different sizes or backends.
    """

    def __init__(self, terms: Sequence[tuple[Array, LinearOperator]], shift: Array = 0.0) -> None:
        first = terms[0][1]
        for _, term in terms[1:]:
            if term.shape != first.shape or type(term._backend) is not type(first._backend):
                raise ValueError(
                    f"cannot add {term} ({term.shape[0]} parameters, "
                    f"{type(term._backend).__name__}) to {first} ({first.shape[0]} "
                    f"parameters, {type(first._backend).__name__}): curvature operators "
                    "add only over the same parameters of the same backend."
                )
        for coefficient in (shift, *(c for c, _ in terms)):
            if not finite_or_traced(coefficient):
                raise ValueError(f"coefficients must be finite numbers, got {coefficient}.")
        self.terms = tuple(terms)
        self.shift = shift
        self._backend = first._backend
        positive = known_nonnegative(shift) and all(
            A.isa(PSD) and known_nonnegative(c) for c, A in terms
        )
        super().__init__(first.dtype, first.shape, annotations={PSD if positive else SelfAdjoint})

    @classmethod
    def of(cls, *operators: LinearOperator) -> CurvatureSum:
        """Return the sum of curvature operators, flattening nested sums and shifts."""
        terms: list[tuple[Array, LinearOperator]] = []
        shift = 0.0
        for A in operators:
            if isinstance(A, CurvatureSum):
                terms.extend(A.terms)
                shift = shift + A.shift
            elif isinstance(A, ShiftedCurvature):
                terms.append((A.scale, A.base))
                shift = shift + A.shift
            else:
                terms.append((1.0, A))
        return cls(terms, shift)

    def _matmat(self, X: Array) -> Array:
        total = self.shift * X
        for c, A in self.terms:
            total = total + c * A._matmat(X)
        return total

    def damped(self, shift: Array) -> CurvatureSum:
        """Return ``Σ_i c_i A_i + (λ + shift) I``."""
        return CurvatureSum(self.terms, self.shift + shift)

    def scaled(self, factor: Array) -> CurvatureSum:
        """Return ``Σ_i (factor c_i) A_i + (factor λ) I``."""
        return CurvatureSum([(factor * c, A) for c, A in self.terms], factor * self.shift)

    def __str__(self) -> str:
        parts = [f"{float(c):g} {A}" for c, A in self.terms]
        return "(" + " + ".join([*parts, f"{float(self.shift):g} I"]) + ")"


#: The operators the matrix-free rules apply to.
MatrixFreeCurvature = CurvatureOperator | ShiftedCurvature | CurvatureSum
