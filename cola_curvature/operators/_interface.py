"""The parameter-space interface every curvature operator offers on top of CoLA's ``@``."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse.linalg
from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract
from cola_curvature.backends import CurvatureBackend


class ParameterSpaceInterface:
    """Mixin for CoLA operators over a model's parameters (needs ``self._backend``).

    Adds validated ``@`` for ``(D,)``, ``(D, k)`` and parameter-shaped input (a list of
    tensors or a pytree shaped like ``params``, answered in the same format), and
    :meth:`to_scipy`.
    """

    _backend: CurvatureBackend

    def __matmul__(self, X: Any) -> Any:
        """Multiply by ``(D,)``, ``(D, k)``, a CoLA operator, or input shaped like ``params``."""
        if isinstance(X, LinearOperator):
            return super().__matmul__(X)
        if self._backend.is_param_format(X):
            matrix = self._backend.as_param_matrix(X)
            self._check_finite(matrix)
            return self._backend.as_param_format(self._matmat(matrix))
        self._check_matrix(X)
        if X.ndim == 2 and X.shape[1] == 0:
            return X[:, :0]
        return super().__matmul__(X)

    def _check_matrix(self, v: Any) -> None:
        """Raise unless ``v`` is a finite backend array of shape ``(D,)`` or ``(D, k)``."""
        backend = self._backend
        backend.check_array(v)
        if v.ndim not in (1, 2) or v.shape[0] != backend.num_params:
            raise ValueError(
                f"params have {backend.num_params} entries but v has shape {tuple(v.shape)}; "
                f"expected (D,) or (D, k) with D={backend.num_params}, or "
                f"{backend.param_format}."
            )
        self._check_finite(v)

    def _check_finite(self, v: Any) -> None:
        """Raise ``ValueError`` when concrete input holds NaN or infinite entries.

        A product would spread them over every entry of the result (``0 · ∞`` is NaN);
        traced input (inside ``jax.jit``) has no values to check and is let through.
        """
        if is_abstract(v):
            return
        if not self._backend.all_finite(v):
            raise ValueError(
                "v contains NaN or infinite entries; a curvature product would turn them into "
                "NaN everywhere. Clean the vector (e.g. replace non-finite entries) first."
            )

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """Return a symmetric SciPy ``LinearOperator`` on NumPy arrays (copied to ``device``)."""

        def matmat(x: np.ndarray) -> np.ndarray:
            matrix = x.reshape(self.shape[1], -1)
            v = self.xnp.array(matrix, dtype=self.dtype, device=self.device)
            return self.xnp.to_np(self._matmat(v)).reshape(x.shape)

        probe = self.xnp.zeros((1,), dtype=self.dtype, device=self.device)
        return scipy.sparse.linalg.LinearOperator(
            self.shape,
            matvec=matmat,
            matmat=matmat,
            rmatvec=matmat,
            rmatmat=matmat,
            dtype=self.xnp.to_np(probe).dtype,
        )
