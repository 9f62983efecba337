"""Validation of user input shared by all operators, with errors that name the fix."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from cola_curvature._tracing import is_abstract


def check_data(data: Any) -> None:
    """Raise ``TypeError`` unless ``data`` can be iterated over more than once."""
    if isinstance(data, Iterator) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a re-iterable of (X, y) batches such as a list or a DataLoader, "
            f"got {type(data).__name__}; wrap a generator in list(...)."
        )


def array_leaves(obj: Any) -> Iterator[Any]:
    """Yield the array-like leaves (anything with ``shape`` and ``dtype``) of nested batches."""
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from array_leaves(item)
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        yield obj


def check_array_library(batch: Any, accepted: tuple[type, ...], model: str, fix: str) -> None:
    """Raise ``TypeError`` when a batch holds arrays of another library.

    E.g. torch tensors in the data of a JAX model or JAX arrays in a torch model's: the
    message names the array type and ``fix``, the conversion to apply.
    """
    for leaf in array_leaves(batch):
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


def _checked_batch_size(size: Any, targets: Any, index: int) -> int:
    """Return the example count of batch ``index`` after checking it against its targets.

    The count must be a non-negative integer (not a float or a bool) and equal the length
    of the targets' leading axis, which holds one entry per example for every loss.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(
            f"the batch size of batch {index} is {size!r} ({type(size).__name__}); "
            "batch_size_fn must return an int, the number of examples in the batch."
        )
    size = int(size)
    rows = targets.shape[0] if len(targets.shape) > 0 else None
    if size < 0 or (rows is not None and size != rows):
        raise ValueError(
            f"the batch size of batch {index} is {size}, but its targets hold {rows} examples "
            "along axis 0; batch_size_fn must return the number of examples in the batch."
        )
    return size


NONDETERMINISM_CAUSES = (
    "Likely causes: dropout or other randomness in train mode (call model.eval()), "
    "batch norm in train mode, data augmentation, or a DataLoader with shuffling "
    "(use shuffle=False). Pass check_deterministic=False to skip this check."
)

TRACED = (
    "check_deterministic compares two passes over data (and two products) by value, which "
    "cannot be done on traced parameters or data (inside jax.jit or jax.vmap). Pass "
    "check_deterministic=False there, and check once outside the transformation with "
    "concrete values if needed."
)


def batches_equal(first: Any, second: Any) -> bool:
    """Return whether two batches hold the same arrays (any framework), entry for entry."""
    a, b = list(array_leaves(first)), list(array_leaves(second))
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if tuple(x.shape) != tuple(y.shape):
            return False
        same = (x == y).all()
        if is_abstract(same):  # inside jax.jit even concrete arrays compare to a tracer
            raise ValueError(TRACED)
        if not bool(same):
            return False
    return True


def _check_twin(batch: Any, twin: Iterator[Any] | None) -> None:
    """Raise ``RuntimeError`` unless the twin pass over the data yields the same batch.

    ``batch`` is ``None`` after the last batch: the twin must be exhausted too.
    """
    if twin is None:
        return
    other = next(twin, None)
    same = other is None if batch is None else batches_equal(batch, other)
    if not same:
        raise RuntimeError(f"Two passes over data gave different batches. {NONDETERMINISM_CAUSES}")


def checked_example_count(
    data: Iterable[Any],
    batch_size_fn: Callable[[Any], int],
    backend: Any,
    check_deterministic: bool = False,
) -> int:
    """Return the number of examples in ``data`` after checking every batch, in one pass.

    ``backend`` is the operator's curvature backend (its ``check_batch`` validates arrays).
    Each batch must be a pair ``(X, y)`` with array targets, without NaN or infinite
    values, whose example count (``batch_size_fn(X)``) matches the targets' length. With
    ``check_deterministic`` a second iterator walks the data alongside, and any batch that
    differs between the two raises ``RuntimeError`` (shuffling, augmentation).
    """
    twin = iter(data) if check_deterministic else None
    counted = 0
    for index, batch in enumerate(data):
        inputs, targets = _unpack(batch, index)
        if not (hasattr(targets, "shape") and hasattr(targets, "dtype")):
            raise TypeError(
                f"the targets of batch {index} are a {type(targets).__name__}; expected an "
                "array of the model's library (e.g. torch.as_tensor(y) or jnp.asarray(y))."
            )
        backend.check_batch((inputs, targets))
        counted += _checked_batch_size(batch_size_fn(inputs), targets, index)
        _check_twin(batch, twin)
    _check_twin(None, twin)
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
