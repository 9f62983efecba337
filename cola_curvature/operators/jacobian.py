"""The Jacobian of a model's outputs over a data set, and its transpose, as CoLA operators."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from cola.ops import LinearOperator

from cola_curvature._checks import NONDETERMINISM_CAUSES
from cola_curvature._tracing import is_abstract
from cola_curvature.backends import CurvatureBackend, curvature_backend
from cola_curvature.operators._data import CurvatureData
from cola_curvature.operators._rectangular import RectangularInterface
from cola_curvature.parameter_layout import stack_columns
from cola_curvature.types import Array


class OutputJacobian:
    """Products with ``J`` and ``Jᵀ``, ``J`` of shape ``(N · C, D)``, stacked over the data.

    Row ``n · C + c`` of ``J`` is ``∂[f_θ(x_n)]_c / ∂θ``: ``N`` examples in data order,
    each one's ``C`` output entries flattened in C order. :class:`Jacobian` and
    :class:`JacobianTranspose` share one instance, so ``J.T`` costs nothing to build.
    The backend is built without a loss (``loss_func=None``): nothing here needs one.

    Args:
        model: As :class:`~cola_curvature.operators._base.CurvatureOperator`.
        params: As :class:`~cola_curvature.operators._base.CurvatureOperator`.
        data: A re-iterable of ``(X, y)`` batches (``y`` is not used).
        num_data: ``None``, or the number of examples in ``data`` (it sets the row count,
            so it must equal the count).
        batch_size_fn: ``X -> int`` for inputs that are not a single array.
        progressbar: Show a progress bar over batches during each product.
        check_deterministic: Check the data and the forward pass while counting
            (:class:`CurvatureData`); :meth:`check_deterministic` compares two products.

    """

    def __init__(
        self,
        model: Any,
        params: Any,
        data: Iterable[tuple[Any, Any]],
        num_data: int | None,
        batch_size_fn: Callable[[Any], int] | None,
        progressbar: bool,
        check_deterministic: bool,
    ) -> None:
        self.backend: CurvatureBackend = curvature_backend(model, None, params)
        self.data = CurvatureData(
            data, self.backend, None, batch_size_fn, progressbar, False, check_deterministic
        )
        if num_data is not None and num_data != self.data.num_data:
            raise ValueError(
                f"num_data={num_data} but data holds {self.data.num_data} examples; the "
                "Jacobian has one block of rows per example of data, so num_data must be "
                "None or the number of examples."
            )
        self._batch_size = batch_size_fn or self.backend.batch_size
        with self.backend.preserved_state():
            outputs = self.backend.forward(next(iter(self.data.source))[0])
        #: Shape ``f_θ(x_n)`` of one example's output.
        self.output_shape = tuple(outputs.shape[1:])
        #: Number ``C`` of output entries per example.
        self.num_outputs = math.prod(self.output_shape)
        self.shape = (self.data.num_data * self.num_outputs, self.backend.num_params)
        self.layout = self.backend.layout

    def matmat(self, X: Array) -> Array:
        """Return ``J X`` for ``X`` of shape ``(D, k)``: one forward-mode product per batch."""
        return self.matmat_columns(self.layout.unflatten(X))

    def matmat_columns(self, columns: list[Array]) -> Array:
        """Return ``J V`` of shape ``(N · C, k)`` for per-parameter columns ``V``."""
        backend = self.backend
        blocks = []
        with backend.preserved_state():
            for inputs, _ in self.data.batches("J @ V"):
                jv = backend.output_jvp(columns, inputs)
                if tuple(jv.shape[2:]) != self.output_shape:
                    raise ValueError(
                        f"a batch's model output has shape {tuple(jv.shape[2:])} per example, "
                        f"the first batch's {self.output_shape}; a Jacobian over a data set "
                        "needs one output shape for every example (pad sequences to one "
                        "length)."
                    )
                blocks.append(jv)
        # (k, B, *f_n) per batch → rows n · C + c
        return stack_columns(blocks)

    def transpose_matmat(self, U: Array) -> Array:
        """Return ``Jᵀ U`` for ``U`` of shape ``(N · C, k)``: one reverse-mode product per batch.

        Each batch gets its own ``B · C`` rows of ``U``; the products are summed.
        """
        backend = self.backend
        num_columns = U.shape[1]
        total, start = None, 0
        with backend.preserved_state():
            for inputs, _ in self.data.batches("Jᵀ @ U"):
                stop = start + self._batch_size(inputs) * self.num_outputs
                cotangents = U[start:stop].T.reshape((num_columns, -1, *self.output_shape))
                start = stop
                contribution = backend.output_vjp(cotangents, inputs)
                total = (
                    contribution
                    if total is None
                    else [t + c for t, c in zip(total, contribution, strict=True)]
                )
        return self.layout.flatten(total)

    def check_deterministic(self) -> None:
        """Raise ``RuntimeError`` when two products ``J v`` with the same ``v`` differ.

        Raises:
            ValueError: inside ``jax.jit`` (or another transformation without values),
                where two products cannot be compared.

        """
        backend = self.backend
        probe = backend.random(0).normal((self.shape[1], 1), self.layout.vector())
        first = self.matmat(probe)
        if is_abstract(first):
            raise ValueError(
                "check_deterministic compares two products by value, which a Jacobian cannot "
                "do on traced parameters or data (inside jax.jit or jax.vmap). Pass "
                "check_deterministic=False there."
            )
        if not self.layout.arrays_close(first, self.matmat(probe)):
            raise RuntimeError(f"Two products with the same vector differ. {NONDETERMINISM_CAUSES}")


class _JacobianOperator(RectangularInterface, LinearOperator):
    """A CoLA operator over an :class:`OutputJacobian`; subclasses pick ``J`` or ``Jᵀ``."""

    def __init__(
        self,
        model: Any,
        params: Any,
        data: Iterable[tuple[Any, Any]],
        *,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        check_deterministic: bool = True,
        progressbar: bool = False,
    ) -> None:
        jacobian = OutputJacobian(
            model, params, data, num_data, batch_size_fn, progressbar, check_deterministic
        )
        self._adopt(jacobian)
        if check_deterministic:
            jacobian.check_deterministic()

    def _adopt(self, jacobian: OutputJacobian) -> None:
        """Set up the operator on ``jacobian`` (shape from :meth:`_shape_of`)."""
        self._jacobian = jacobian
        self._backend = jacobian.backend
        LinearOperator.__init__(self, jacobian.backend.dtype, self._shape_of(jacobian))

    def _shape_of(self, jacobian: OutputJacobian) -> tuple[int, int]:
        """Return this operator's shape."""
        raise NotImplementedError

    @classmethod
    def _sharing(cls, other: _JacobianOperator) -> _JacobianOperator:
        """Return the operator of this class on ``other``'s Jacobian (built once, shared)."""
        operator = cls.__new__(cls)
        operator._adopt(other._jacobian)
        operator.device = other.device
        return operator

    @property
    def num_data(self) -> int:
        """Number ``N`` of examples."""
        return self._jacobian.data.num_data

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one example's model output; ``C`` is its number of entries."""
        return self._jacobian.output_shape


class Jacobian(_JacobianOperator):
    r"""Jacobian ``J = ∂f/∂θ`` of the model outputs over a data set, shape ``(N · C, D)``.

    Row ``n · C + c`` is ``∂[f_θ(x_n)]_c / ∂θ``: the ``N`` examples of ``data`` in data
    order, each example's ``C`` output entries flattened in C order (``f[n].reshape(-1)``).
    No loss is involved. ``J @ v`` runs one forward-mode product ``J_b v`` per batch and
    stacks them (torch: dual tensors, or reverse mode for operations without a forward
    derivative; JAX: ``jax.linearize``); ``u @ J`` and ``J.T`` use ``Jᵀ u``, a sum of
    one reverse-mode product per batch (see :class:`JacobianTranspose`).

    Shapes: ``J @ v`` takes ``(D,)``, ``(D, k)`` or parameter-shaped input (a list of
    tensors / a pytree shaped like ``params``) and returns ``(N · C,)`` or ``(N · C, k)``;
    ``u @ J`` takes ``(N · C,)`` or ``(k, N · C)``. ``J.T`` is the
    :class:`JacobianTranspose` on the same data, built without another pass.

    Cost per product and batch: about one forward pass per column (torch: further
    columns replay the taped tangent operations). Data order must be fixed
    (no shuffling): rows follow it. There is no ``distributed`` option: the rows of one
    rank's shard are not a sum over ranks.

    Args:
        model: A ``torch.nn.Module``, a JAX ``model_fn(params, x)`` or a flax / equinox
            module, as for every curvature operator.
        params: The parameters ``θ`` (torch: a list of the model's tensors; JAX: a pytree).
        data: A re-iterable of ``(X, y)`` batches; the targets are not used.
        num_data: ``None`` or the number of examples in ``data``.
        batch_size_fn: ``X -> int`` for inputs that are not a single array.
        check_deterministic: Verify at construction that data, outputs and products are
            reproducible (two passes, two products).
        progressbar: Show a progress bar over batches during each product.

    """

    def _shape_of(self, jacobian: OutputJacobian) -> tuple[int, int]:
        """Return ``(N · C, D)``."""
        return jacobian.shape

    def _matmat(self, X: Array) -> Array:
        """Return ``J X``."""
        return self._jacobian.matmat(X)

    def _rmatmat(self, X: Array) -> Array:
        """Return ``X J = (Jᵀ Xᵀ)ᵀ``."""
        return self._jacobian.transpose_matmat(X.T).T

    def _param_matmul(self, X: Any) -> Array:
        """Return ``J v`` of shape ``(N · C,)`` for ``v`` shaped like ``params``."""
        layout = self._backend.layout
        columns = layout.columns_of(X)
        if not all(is_abstract(c) or layout.all_finite(c) for c in columns):
            raise ValueError(
                "v contains NaN or infinite entries; a product would turn them into NaN "
                "everywhere. Clean the vector (e.g. replace non-finite entries) first."
            )
        return self._jacobian.matmat_columns(columns)[:, 0]

    @property
    def T(self) -> JacobianTranspose:
        """Return ``Jᵀ`` on the same data (shares this operator's backend and batches)."""
        return JacobianTranspose._sharing(self)


class JacobianTranspose(_JacobianOperator):
    r"""Transposed Jacobian ``Jᵀ`` of the model outputs over a data set, shape ``(D, N · C)``.

    ``J`` is :class:`Jacobian` (same row order: example ``n``'s output entry ``c`` is
    entry ``n · C + c`` of ``u``). ``Jᵀ @ u = Σ_b J_bᵀ u_b`` sums one reverse-mode
    product per batch ``b`` over that batch's slice ``u_b`` of ``u``.

    Shapes: ``Jᵀ @ u`` takes ``(N · C,)`` or ``(N · C, k)`` and returns a flat ``(D,)`` or
    ``(D, k)`` array in the flattening order of ``params`` (parameter-shaped output is
    not offered: the input is never parameter-shaped); ``v @ Jᵀ`` takes ``(D,)`` or
    ``(k, D)``. ``Jᵀ.T`` is the :class:`Jacobian`, built without another pass.

    Cost per product and batch: one forward pass plus one backward pass per column.
    Arguments as :class:`Jacobian`.
    """

    def _shape_of(self, jacobian: OutputJacobian) -> tuple[int, int]:
        """Return ``(D, N · C)``."""
        rows, columns = jacobian.shape
        return columns, rows

    def _matmat(self, X: Array) -> Array:
        """Return ``Jᵀ X``."""
        return self._jacobian.transpose_matmat(X)

    def _rmatmat(self, X: Array) -> Array:
        """Return ``X Jᵀ = (J Xᵀ)ᵀ``."""
        return self._jacobian.matmat(X.T).T

    @property
    def T(self) -> Jacobian:
        """Return ``J`` on the same data (shares this operator's backend and batches)."""
        return Jacobian._sharing(self)
