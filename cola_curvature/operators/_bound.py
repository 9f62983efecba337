"""The base of every operator built from a model, a loss, its parameters and a data set."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cola_curvature.backends import CurvatureBackend, curvature_backend
from cola_curvature.operators._data import CurvatureData


class DataBound:
    """Owns the backend and the counted, checked data of an operator (``_backend``, ``_data``).

    :meth:`_bind` is the one constructor prologue of the curvature operators (matrix-free,
    KFAC / EKFAC, diagonal, symmetry) and of :class:`~cola_curvature.Laplace`: it builds the
    backend and reads the data once to count and check it. ``data`` may be the
    :class:`CurvatureData` of another operator over the same batches, which is then reused
    without reading anything again (an operator on a subset of the parameters, another loss).
    The options every such operator shares are those of :meth:`_bind`.
    """

    _backend: CurvatureBackend
    _data: CurvatureData

    def _bind(
        self,
        model: Any,
        loss_func: Any,
        params: Any,
        data: Iterable[tuple[Any, Any]] | CurvatureData,
        *,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        check_deterministic: bool = True,
        progressbar: bool = False,
        distributed: bool = False,
    ) -> None:
        """Build the backend of ``(model, loss_func, params)`` and bind the data to it.

        Args:
            model: The model (see :class:`~cola_curvature.operators._base.CurvatureOperator`).
            loss_func: The loss, or ``None`` for model-output products only.
            params: The parameters the curvature is taken with respect to.
            data: A re-iterable of ``(X, y)`` batches, or another operator's
                :class:`CurvatureData`, reused as it is: its count, batching and ranks were
                fixed when it was built, so a ``num_data``, ``batch_size_fn`` or
                ``distributed`` that disagrees with them raises ``ValueError``
                (``check_deterministic`` and ``progressbar`` are its own, too).
            num_data: Number of examples in ``data`` (over all ranks); counted when ``None``.
                A larger value sets the loss scaling of a data set ``data`` is part of.
            batch_size_fn: ``X -> int`` for inputs that are not a single array.
            check_deterministic: Check while counting that a second pass over the data gives
                the same batches and that two forward passes agree (``RuntimeError``
                otherwise); matrix-free operators also compare two products. Needs values:
                pass ``False`` when building inside ``jax.jit``.
            progressbar: Show a progress bar over the batches.
            distributed: ``data`` is this rank's shard of a data set split over an
                initialised ``torch.distributed`` process group; results are summed over the
                ranks, so every rank holds the same operator.
        """
        self._backend = curvature_backend(model, loss_func, params)
        if isinstance(data, CurvatureData):
            _check_reused_options(data, num_data, batch_size_fn, distributed)
            self._data = data.rebound(self._backend)
            return
        self._data = CurvatureData(
            data,
            self._backend,
            num_data,
            batch_size_fn,
            progressbar,
            distributed,
            check_deterministic,
        )

    @property
    def num_data(self) -> int:
        """Number of examples ``N`` the curvature is aggregated over."""
        return self._data.num_data


def _check_reused_options(
    data: CurvatureData,
    num_data: int | None,
    batch_size_fn: Callable[[Any], int] | None,
    distributed: bool,
) -> None:
    """Raise ``ValueError`` when options would change an already built ``CurvatureData``."""
    conflicts = []
    if num_data is not None and num_data != data.num_data:
        conflicts.append(f"num_data={num_data} (the data holds num_data={data.num_data})")
    if batch_size_fn is not None:
        conflicts.append("batch_size_fn (the data's batches are already counted)")
    if distributed and data.process_group is None:
        conflicts.append("distributed=True (the data was built for one process)")
    if conflicts:
        raise ValueError(
            "data is another operator's CurvatureData, whose options are fixed; it cannot "
            f"take {', '.join(conflicts)}. Pass the batches themselves to set new options."
        )
