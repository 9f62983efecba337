"""The parameter-space interface every curvature operator offers on top of CoLA's ``@``."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse.linalg
from cola.ops import LinearOperator

from cola_curvature._tracing import is_abstract
from cola_curvature.backends import CurvatureBackend
from cola_curvature.parameter_layout import ParameterLayout


class ParameterSpaceInterface:
    """Mixin for CoLA operators over a model's parameters (needs ``self._backend``).

    Adds validated ``@`` for ``(D,)``, ``(D, k)`` and parameter-shaped input (a list of
    tensors or a pytree shaped like ``params``, answered in the same format), and
    :meth:`to_scipy`.
    """

    _backend: CurvatureBackend

    @property
    def _layout(self) -> ParameterLayout:
        """The parameters' flat order and user-facing format."""
        return self._backend.layout

    def __matmul__(self, X: Any) -> Any:
        """Multiply by ``(D,)``, ``(D, k)``, a CoLA operator, or input shaped like ``params``."""
        if isinstance(X, LinearOperator):
            return super().__matmul__(X)
        layout = self._layout
        if layout.is_param_format(X):
            columns = layout.columns_of(X)
            for column in columns:
                self._check_finite(column)
            return layout.value_of(self._matmat_columns(columns))
        self._check_matrix(X)
        if X.ndim == 2 and X.shape[1] == 0:
            return X[:, :0]
        return super().__matmul__(X)

    def _matmat_columns(self, columns: list[Any]) -> list[Any]:
        """Return ``A V`` for per-parameter columns ``V`` (one ``(k, *θ_p.shape)`` array each).

        Through the ``(D, k)`` product by default; the matrix-free operators override it to
        run on the columns directly, never stacking them.
        """
        layout = self._layout
        return layout.unflatten(self._matmat(layout.flatten(columns)))

    def _check_matrix(self, v: Any) -> None:
        """Raise unless ``v`` is a finite backend array of shape ``(D,)`` or ``(D, k)``."""
        layout = self._layout
        layout.check_array(v)
        if v.ndim not in (1, 2) or v.shape[0] != layout.num_params:
            raise ValueError(
                f"params have {layout.num_params} entries but v has shape {tuple(v.shape)}; "
                f"expected (D,) or (D, k) with D={layout.num_params}, or "
                f"{layout.structure.description}."
            )
        self._check_finite(v)

    def _check_finite(self, v: Any) -> None:
        """Raise ``ValueError`` when concrete input holds NaN or infinite entries.

        A product would spread them over every entry of the result (``0 · ∞`` is NaN);
        traced input (inside ``jax.jit``) has no values to check and is let through.
        """
        if is_abstract(v):
            return
        if not self._layout.all_finite(v):
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
