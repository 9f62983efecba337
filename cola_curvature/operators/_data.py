"""The batches a curvature is aggregated over, and the checks that make it reproducible."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

from cola_curvature._checks import (
    NONDETERMINISM_CAUSES,
    TRACED,
    check_data,
    checked_example_count,
    resolve_num_data,
)
from cola_curvature._tracing import is_abstract
from cola_curvature.backends import CurvatureBackend
from cola_curvature.backends._protocol import ProcessGroup


class CurvatureData:
    """A re-iterable of ``(X, y)`` batches with its example count ``N``.

    With ``distributed=True`` the batches are this process's shard of a data set split
    over the ranks of an initialised ``torch.distributed`` process group: ``N`` is the
    total over all ranks, and :meth:`combine` sums a partial result over them (one
    ``all_reduce``), so every rank holds the product over the whole data set. At
    construction every rank must hold at least one example and the same parameter values.

    Examples are numbered ``0, …, N' - 1`` in iteration order (``N'`` the examples held;
    distributed: rank ``r``'s first example is numbered by the sum of the counts of ranks
    ``< r``, as if the shards were concatenated in rank order). Monte-Carlo targets are
    keyed by these global indices (:meth:`sampled_batches`).

    Args:
        data: The batches, e.g. a list or a ``DataLoader``.
        backend: The backend that checks batches and runs the model.
        num_data: Number of examples (over all ranks); counted when ``None``.
        batch_size_fn: ``X -> int``; the backend's default reads ``X.shape[0]``.
        progressbar: Show a tqdm bar when iterating.
        distributed: Whether ``data`` is one rank's shard (see above).
        check_deterministic: Check, in the same pass that counts and validates the batches,
            that a second pass gives the same batches, and that two forward passes on the
            first batch agree (``RuntimeError`` otherwise).

    Every batch is read once here (twice with ``check_deterministic``, side by side); an
    operator built on another operator's data (:meth:`rebound`) reads nothing again.
    """

    def __init__(
        self,
        data: Iterable[tuple[Any, Any]],
        backend: CurvatureBackend,
        num_data: int | None,
        batch_size_fn: Callable[[Any], int] | None,
        progressbar: bool,
        distributed: bool = False,
        check_deterministic: bool = False,
    ) -> None:
        check_data(data)
        self.source = data
        self._backend = backend
        self._progressbar = progressbar
        self._batch_size = batch_size_fn or backend.batch_size
        self._first_example = 0
        #: The ranks the results are summed over (``None`` unless ``distributed``).
        self.process_group: ProcessGroup | None = backend.process_group() if distributed else None
        with backend.preserved_state():
            counted = checked_example_count(data, self._batch_size, backend, check_deterministic)
        if self.process_group is not None:
            counts = self.process_group.gather_counts(counted)
            self._first_example = sum(counts[: self.process_group.rank()])
            empty = [rank for rank, count in enumerate(counts) if count == 0]
            if empty:
                raise ValueError(
                    f"ranks {empty} hold no examples; with distributed=True every rank needs "
                    "a non-empty shard of the data."
                )
            self.process_group.check_same_parameters(backend.layout.vector())
            counted = sum(counts)
        self.num_data = resolve_num_data(counted, num_data)
        if check_deterministic:
            with backend.preserved_state():
                self._check_outputs()

    def combine(self, partial: Any) -> Any:
        """Return ``partial`` summed over the ranks (itself unless ``distributed``)."""
        return partial if self.process_group is None else self.process_group.sum(partial)

    def combine_columns(self, columns: list[Any]) -> list[Any]:
        """Return per-parameter columns summed over the ranks, with one ``all_reduce`` for all."""
        if self.process_group is None:
            return columns
        layout = self._backend.layout
        return layout.unflatten(self.combine(layout.flatten(columns)))

    def batches(self, desc: str) -> Iterator[tuple[Any, Any]]:
        """Iterate over the batches, with a progress bar when enabled."""
        if not self._progressbar:
            return iter(self.source)
        return iter(tqdm(self.source, desc=desc, leave=False))

    def sampled_batches(self, desc: str, seed: int | None) -> Iterator[tuple[Any, Any]]:
        """Iterate over ``(batch, rng)``: ``rng`` draws the batch's Monte-Carlo targets.

        Example ``n`` of the data set draws its samples from a stream keyed by ``(seed, n)``
        with ``n`` its global index (see the class docstring), so any split of the same
        examples, in the same order, into batches gives the same targets. ``rng`` is
        ``None`` when ``seed`` is (exact curvatures draw nothing).
        """
        first_example = self._first_example
        for batch in self.batches(desc):
            rng = None if seed is None else self._backend.example_random(seed, first_example)
            yield batch, rng
            first_example += self._batch_size(batch[0])

    def rebound(self, backend: CurvatureBackend) -> CurvatureData:
        """Return the same counted and checked batches, run through ``backend``.

        For an operator on a subset of the parameters, or with another loss, over the same
        data (KFAC's uncovered block, a Laplace curvature): nothing is read again.
        """
        data = copy.copy(self)
        data._backend = backend
        return data

    def _check_outputs(self) -> None:
        """Raise ``RuntimeError`` unless two forward passes on the first batch agree."""
        backend = self._backend
        inputs = next(iter(self.source))[0]
        outputs = backend.forward(inputs)
        if is_abstract(outputs):
            raise ValueError(TRACED)
        if not backend.layout.arrays_close(outputs, backend.forward(inputs)):
            raise RuntimeError(
                f"Two forward passes gave different outputs. {NONDETERMINISM_CAUSES}"
            )
