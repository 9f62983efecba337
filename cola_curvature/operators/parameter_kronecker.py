"""Kronecker-factored operators over a model's parameters, whose derived operators stay so."""

from __future__ import annotations

from collections.abc import Sequence

from cola.ops import LinearOperator

from cola_curvature.backends import CurvatureBackend
from cola_curvature.operators._interface import ParameterSpaceInterface
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.types import Array


class ParameterKroneckerFactored(ParameterSpaceInterface, KroneckerFactored):
    """A :class:`KroneckerFactored` operator that takes parameter-shaped input.

    Everything derived from it block by block (``K + λI``, ``c K``, ``K⁻¹``, ``√K``,
    ``f(K)``: all built by :meth:`with_blocks`) is again one, over the same backend, so it
    keeps the whole contract: ``(D,)``, ``(D, k)`` and parameter-shaped ``@``, input checks,
    :meth:`to_scipy`. :class:`~cola_curvature.KFAC`, :class:`~cola_curvature.EKFAC`,
    :class:`~cola_curvature.DiagonalCurvature` and :class:`~cola_curvature.SymmetryCurvature`
    are such operators.
    """

    def __init__(
        self,
        backend: CurvatureBackend,
        blocks: Sequence[LinearOperator],
        permutation: Array,
        annotations: set | None = None,
        inverse_permutation: Array | None = None,
    ) -> None:
        self._backend = backend
        KroneckerFactored.__init__(self, blocks, permutation, annotations, inverse_permutation)

    def with_blocks(
        self, blocks: Sequence[LinearOperator], annotations: set | None = None
    ) -> ParameterKroneckerFactored:
        """Return the same permuted block structure with new blocks, over the same parameters."""
        return ParameterKroneckerFactored(
            self._backend,
            blocks,
            self.permutation,
            set(self.annotations) if annotations is None else annotations,
            self.inverse_permutation,
        )
