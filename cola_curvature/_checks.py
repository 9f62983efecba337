"""Validation of user input shared by all operators, with errors that name the fix."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from cola_curvature.backends import CurvatureBackend


def check_data(data: Any) -> None:
    """Raise ``TypeError`` unless ``data`` can be iterated over more than once."""
    if isinstance(data, Iterator) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a re-iterable of (X, y) batches such as a list or a DataLoader, "
            f"got {type(data).__name__}; wrap a generator in list(...)."
        )


def _array_leaves(obj: Any) -> Iterator[Any]:
    """Yield the array-like leaves (anything with ``shape`` and ``dtype``) of nested batches."""
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _array_leaves(item)
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        yield obj


def check_array_library(batch: Any, accepted: tuple[type, ...], model: str, fix: str) -> None:
    """Raise ``TypeError`` when a batch holds arrays of another library.

    E.g. torch tensors in the data of a JAX model or JAX arrays in a torch model's: the
    message names the array type and ``fix``, the conversion to apply.
    """
    for leaf in _array_leaves(batch):
        if not isinstance(leaf, accepted):
            kind = f"{type(leaf).__module__}.{type(leaf).__name__}"
            raise TypeError(f"data holds a {kind}, but {model} needs {fix}.")


def _unpack(batch: Any, index: int) -> tuple[Any, Any]:
    """Return ``(X, y)`` from one batch or raise naming the expected format."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"batch {index} of data is a {type(batch).__name__}; expected a pair (X, y)."
        )
    return batch[0], batch[1]


def count_examples(
    data: Iterable[Any], batch_size_fn: Callable[[Any], int], backend: CurvatureBackend
) -> int:
    """Return the number of examples in ``data`` after checking every batch once.

    Each batch must be a pair ``(X, y)`` without NaN or infinite values.
    """
    counted = 0
    for index, batch in enumerate(data):
        inputs, targets = _unpack(batch, index)
        backend.check_batch((inputs, targets))
        counted += batch_size_fn(inputs)
    return counted


def resolve_num_data(counted: int, num_data: int | None) -> int:
    """Return the number of examples ``N``: the count, or a given ``num_data`` not below it.

    A given ``num_data`` replaces the count (``data`` may be one part of a larger data
    set whose loss scaling applies).
    """
    if counted == 0:
        raise ValueError("data is empty; pass at least one (X, y) batch with one example.")
    if num_data is None:
        return counted
    if num_data < counted:
        raise ValueError(f"num_data={num_data} but data holds {counted} examples.")
    return num_data


def check_mc_samples(mc_samples: Any) -> None:
    """Raise ``ValueError`` unless ``mc_samples`` is a positive integer."""
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
