"""The block of a parameter-space operator for two subsets of the parameters, matrix-free."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from numbers import Integral
from typing import Any

from cola.annotations import SelfAdjoint
from cola.ops import LinearOperator

from cola_curvature.operators._interface import ParameterSpaceInterface
from cola_curvature.operators._rectangular import RectangularInterface
from cola_curvature.types import Array


def _parameter_indices(selection: Any, parameters: Sequence[Any], name: str) -> list[int]:
    """Return the positions in ``params`` of ``selection`` (indices or the arrays themselves)."""
    if not isinstance(selection, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of positions in params or of the parameters themselves, "
            f"got {type(selection).__name__}."
        )
    if len(selection) == 0:
        raise ValueError(f"{name} is empty; choose at least one parameter.")
    indices = []
    for i, item in enumerate(selection):
        if isinstance(item, Integral) and not isinstance(item, bool):
            if not 0 <= item < len(parameters):
                raise ValueError(
                    f"{name}[{i}] = {item} is not a position in params (0 to "
                    f"{len(parameters) - 1})."
                )
            indices.append(int(item))
            continue
        matches = [j for j, p in enumerate(parameters) if p is item]
        if not matches:
            raise ValueError(
                f"{name}[{i}] (a {type(item).__name__}) is neither a position in params nor one "
                "of the operator's parameters; pass the same objects as params, or positions."
            )
        indices.append(matches[0])
    if len(set(indices)) != len(indices):
        raise ValueError(f"{name} selects a parameter more than once: positions {indices}.")
    return indices


class Submatrix(RectangularInterface, LinearOperator):
    r"""Block ``A[rows, columns]`` of a parameter-space operator ``A``, matrix-free.

    ``rows`` and ``columns`` are the entries of two subsets of the parameters ``params``
    the operator was built on, each given as a list of positions in ``params`` or of the
    parameters themselves (torch tensors / JAX leaves, matched by identity), in the order
    given; the block's rows and columns follow that order, each parameter flattened as in
    ``A``. ``S @ v`` embeds ``v`` in a zero vector of size ``D``, multiplies by ``A`` and
    keeps the rows: one product with ``A`` per product with ``S``. ``A`` is any operator
    over a model's parameters (``GGN``, ``Hessian``, ``KFAC``, ``EmpiricalFisher``, sums
    and damped versions of them, …).

    Shapes: ``(D_rows, D_columns)``; ``S @ v`` takes ``(D_columns,)``, ``(D_columns, k)``,
    or a list of arrays shaped like the column parameters (answered as a list shaped like
    the row parameters); ``u @ S`` takes ``(D_rows,)`` or ``(k, D_rows)``.
    With ``rows == columns`` the block is a principal submatrix and keeps ``A``'s
    annotations (``PSD``, ``SelfAdjoint``). For a self-adjoint ``A``, ``S.T`` is the block
    ``A[columns, rows]``.

    Args:
        operator: The square operator ``A`` over a model's parameters.
        row_params: The parameters of the rows.
        column_params: The parameters of the columns.

    """

    def __init__(self, operator: Any, row_params: Any, column_params: Any) -> None:
        if not isinstance(operator, ParameterSpaceInterface):
            raise TypeError(
                "operator must be an operator over a model's parameters (cc.GGN, cc.Hessian, "
                f"cc.KFAC, ... or their sums), got {type(operator).__name__}."
            )
        backend = operator._backend
        sizes = backend.layout.sizes
        _, parameters = backend.parameter_subset(range(len(sizes)))
        self._operator = operator
        self._backend = backend
        self._shapes = [tuple(p.shape) for p in parameters]
        self._offsets = [0, *accumulate(sizes)]
        self._rows = _parameter_indices(row_params, parameters, "row_params")
        self._columns = _parameter_indices(column_params, parameters, "column_params")
        shape = (sum(sizes[i] for i in self._rows), sum(sizes[j] for j in self._columns))
        annotations = set(operator.annotations) if self._rows == self._columns else set()
        super().__init__(operator.dtype, shape, annotations=annotations)
        self.device = operator.device

    @property
    def row_indices(self) -> list[int]:
        """Positions in ``params`` of the row parameters, in block order."""
        return list(self._rows)

    @property
    def column_indices(self) -> list[int]:
        """Positions in ``params`` of the column parameters, in block order."""
        return list(self._columns)

    def _block_matmat(self, rows: list[int], columns: list[int], X: Array) -> Array:
        """Return ``A[rows, columns] X``: embed ``X`` with zeros, multiply, keep the rows."""
        xnp, offsets = self.xnp, self._offsets
        placed, start = {}, 0
        for j in columns:
            size = offsets[j + 1] - offsets[j]
            placed[j] = X[start : start + size]
            start += size
        pieces = [
            placed[j]
            if j in placed
            else xnp.zeros((offsets[j + 1] - offsets[j], X.shape[1]), self.dtype, self.device)
            for j in range(len(offsets) - 1)
        ]
        product = self._operator @ xnp.concat(pieces, axis=0)
        return xnp.concat([product[offsets[i] : offsets[i + 1]] for i in rows], axis=0)

    def _matmat(self, X: Array) -> Array:
        """Return ``A[rows, columns] X``."""
        return self._block_matmat(self._rows, self._columns, X)

    def _rmatmat(self, X: Array) -> Array:
        """Return ``X A[rows, columns]``: ``(A[columns, rows] Xᵀ)ᵀ`` for a self-adjoint ``A``."""
        if not self._operator.isa(SelfAdjoint):
            return super()._rmatmat(X)
        return self._block_matmat(self._columns, self._rows, X.T).T

    def _param_matmul(self, X: Any) -> list[Array]:
        """Return ``S v`` for ``v`` a list shaped like the column parameters, as a list."""
        expected = [self._shapes[j] for j in self._columns]
        shapes = [tuple(getattr(t, "shape", ())) for t in X] if isinstance(X, (list, tuple)) else []
        if shapes != expected:
            raise ValueError(
                f"parameter-shaped input to a Submatrix must be a list of {len(expected)} arrays "
                f"of shapes {expected} (the column parameters), got {type(X).__name__} with "
                f"shapes {shapes}."
            )
        for t in X:
            self._backend.layout.check_array(t)
        matrix = self.xnp.concat([t.reshape(-1, 1) for t in X], axis=0)
        self._check_operand(matrix, axis=0)
        product, start, result = self._matmat(matrix), 0, []
        for i in self._rows:
            stop = start + self._offsets[i + 1] - self._offsets[i]
            result.append(product[start:stop, 0].reshape(self._shapes[i]))
            start = stop
        return result

    @property
    def T(self) -> LinearOperator:
        """Return ``A[columns, rows]`` for a self-adjoint ``A``, else CoLA's transpose."""
        if self._operator.isa(SelfAdjoint):
            return Submatrix(self._operator, self._columns, self._rows)
        return super().T
