"""What a matrix-free algorithm offers the rules: one abstract base per ``cola.linalg`` question.

An algorithm is a frozen dataclass of its knobs that subclasses one or more of these bases
and implements their methods; the rules in :mod:`dispatch_rules` dispatch on the base
(``alg: TraceEstimator``) and call the method, so a new algorithm is one file and needs
no edit of the rules. All methods take a square, symmetric CoLA operator ``A`` of either
backend and reach its arrays through ``A.xnp`` and ``A @ V`` only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from cola.linalg import Algorithm
from cola.ops import LinearOperator

from cola_curvature.types import Array


class TraceEstimator(Algorithm, ABC):
    """An estimate of ``tr A`` (``cola.linalg.trace`` of a matrix-free operator)."""

    @abstractmethod
    def trace(self, A: LinearOperator) -> Array:
        """Return the estimate of ``tr A = Σ_i A_ii``, a scalar array."""


class DiagonalEstimator(Algorithm, ABC):
    """An estimate of ``diag A`` (``cola.linalg.diag`` of a matrix-free operator)."""

    @abstractmethod
    def diagonal(self, A: LinearOperator) -> Array:
        """Return the estimate of ``(A_11, …, A_DD)``, shape ``(D,)``."""


class LogdetEstimator(Algorithm, ABC):
    """An estimate of ``log|det A|`` and the sign of ``det A`` (``cola.linalg.logdet``)."""

    @abstractmethod
    def slogdet(self, A: LinearOperator) -> tuple[Array, Array]:
        """Return ``(sign det A, log|det A|)``; the sign may be ``nan`` when unknown."""


class LinearSolver(Algorithm, ABC):
    """A solver of ``A X = B`` for all columns of ``B`` (``cola.linalg.inv(A) @ B``)."""

    @abstractmethod
    def solve(self, A: LinearOperator, B: Array) -> tuple[Array, dict]:
        """Return ``(X, info)`` with ``X ≈ A⁻¹ B`` ``(D, k)`` and a dict of diagnostics."""


class EigenSolver(Algorithm, ABC):
    """A few eigenpairs of a symmetric ``A`` (``cola.linalg.eig(A, k, which)``)."""

    @abstractmethod
    def eigs(self, A: LinearOperator, k: int, which: str) -> tuple[Array, Array]:
        """Return ``k`` eigenvalues ``(k,)`` ordered by ``which`` and eigenvectors ``(D, k)``.

        ``which``: ``"LM"``/``"SM"`` (largest/smallest magnitude), ``"LA"``/``"SA"``
        (largest/smallest algebraic).
        """


class MatrixFunctionMethod(Algorithm, ABC):
    """Products ``f(A) V`` with a spectral function ``f`` (``sqrt``, ``isqrt``, ``apply_unary``)."""

    @abstractmethod
    def apply(self, A: LinearOperator, f: Callable[[Array], Array], V: Array) -> Array:
        """Return ``f(A) V = Q f(Λ) Qᵀ V`` for ``A = Q Λ Qᵀ`` and ``V`` of shape ``(D, k)``."""


__all__ = [
    "DiagonalEstimator",
    "EigenSolver",
    "LinearSolver",
    "LogdetEstimator",
    "MatrixFunctionMethod",
    "TraceEstimator",
]
