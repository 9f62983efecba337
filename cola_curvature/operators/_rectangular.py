"""Checked products and SciPy export of the non-square operators over a model's parameters."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse.linalg
from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract
from cola_curvature.backends import CurvatureBackend
from cola_curvature.types import Array


class RectangularInterface:
    """Mixin for CoLA operators ``A`` of shape ``(m, n)`` over a backend (needs ``self._backend``).

    ``A @ X`` takes ``(n,)`` or ``(n, k)`` and ``X @ A`` takes ``(m,)`` or ``(k, m)``, both
    checked for the backend's array type, dtype, device, shape and finite entries.
    Parameter-shaped input (see
    :meth:`~cola_curvature.parameter_layout.ParameterLayout.is_param_format`) goes to
    :meth:`_param_matmul`, which refuses it unless a subclass accepts it.
    Subclasses implement ``_matmat`` and ``_rmatmat``; :meth:`to_scipy` exports both.
    """

    _backend: CurvatureBackend

    def __matmul__(self, X: Any) -> Any:
        """Multiply by ``(n,)``, ``(n, k)``, a CoLA operator, or parameter-shaped input."""
        if isinstance(X, LinearOperator):
            return super().__matmul__(X)
        if self._backend.layout.is_param_format(X):
            return self._param_matmul(X)
        self._check_operand(X, axis=0)
        if X.ndim == 2 and X.shape[1] == 0:
            return self._zeros((self.shape[0], 0))
        return super().__matmul__(X)

    def __rmatmul__(self, X: Any) -> Any:
        """Return ``X @ A`` for ``X`` of shape ``(m,)`` or ``(k, m)``, or a CoLA operator."""
        if isinstance(X, LinearOperator):
            return super().__rmatmul__(X)
        self._check_operand(X, axis=-1)
        if X.ndim == 2 and X.shape[0] == 0:
            return self._zeros((0, self.shape[1]))
        return super().__rmatmul__(X)

    def _param_matmul(self, X: Any) -> Any:
        """Refuse parameter-shaped input (subclasses with a parameter side accept it)."""
        raise TypeError(
            f"{type(self).__name__} of shape {self.shape} takes an array of shape "
            f"({self.shape[1]},) or ({self.shape[1]}, k), got a {type(X).__name__}."
        )

    def _zeros(self, shape: tuple[int, int]) -> Array:
        """Return zeros of ``shape`` with the operator's dtype and device."""
        return self.xnp.zeros(shape, dtype=self.dtype, device=self.device)

    def _check_operand(self, X: Any, axis: int) -> None:
        """Raise unless ``X`` is a finite backend array whose ``axis`` fits the operator."""
        self._backend.layout.check_array(X)
        size = self.shape[1] if axis == 0 else self.shape[0]
        if X.ndim not in (1, 2) or X.shape[axis] != size:
            expected = f"({size}, k)" if axis == 0 else f"(k, {size})"
            side = "A @ v" if axis == 0 else "v @ A"
            raise ValueError(
                f"{type(self).__name__} has shape {tuple(self.shape)}, so {side} needs v of "
                f"shape ({size},) or {expected}; got {tuple(X.shape)}."
            )
        if not is_abstract(X) and not self._backend.layout.all_finite(X):
            raise ValueError(
                "v contains NaN or infinite entries; a product would turn them into NaN "
                "everywhere. Clean the vector (e.g. replace non-finite entries) first."
            )

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """Return a SciPy ``LinearOperator`` on NumPy arrays (copied to ``device``).

        ``matvec``/``matmat`` multiply by ``A``, ``rmatvec``/``rmatmat`` by ``Aᵀ``.
        """

        def apply(product: Any, x: np.ndarray) -> np.ndarray:
            matrix = self.xnp.array(x.reshape(x.shape[0], -1), dtype=self.dtype, device=self.device)
            result = self.xnp.to_np(product(matrix))
            return result.reshape(-1) if x.ndim == 1 else result

        def matmat(x: np.ndarray) -> np.ndarray:
            return apply(self._matmat, x)

        def rmatmat(x: np.ndarray) -> np.ndarray:
            return apply(lambda u: self._rmatmat(u.T).T, x)

        probe = self._zeros((1, 1))
        return scipy.sparse.linalg.LinearOperator(
            tuple(self.shape),
            matvec=matmat,
            matmat=matmat,
            rmatvec=rmatmat,
            rmatmat=rmatmat,
            dtype=self.xnp.to_np(probe).dtype,
        )
