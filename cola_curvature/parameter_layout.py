"""How a model's parameters map to the rows of a curvature matrix, written once for every backend.

A curvature over parameters ``θ = (θ_1, …, θ_P)`` acts on flat vectors of ``D = Σ_p |θ_p|``
entries: parameter ``p`` occupies rows ``offset_p … offset_p + |θ_p| - 1``, raveled in C
order. Products run per parameter on *columns*, one array ``(k, *θ_p.shape)`` per parameter
for ``k`` vectors. :class:`ParameterLayout` converts between the three forms (a ``(D, k)``
matrix, per-parameter columns, and the user's parameter-shaped input: a list of tensors for
torch, a pytree for JAX) and checks arrays, all through CoLA's backend-neutral ``xnp``;
the backends only say what their arrays and their parameter containers look like
(:class:`ArrayKind`, :class:`ParameterStructure`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cola.backends import get_library_fns

from cola_curvature.types import Array


def _unchanged(x: Any) -> Any:
    """Return ``x`` (the default of :attr:`ArrayKind.thaw` and :attr:`ArrayKind.compiled`)."""
    return x


def stack_columns(columns: Sequence[Array]) -> Array:
    """Return the ``(D, k)`` matrix of per-parameter columns ``(k, *θ_p.shape)``."""
    xnp = get_library_fns(columns[0].dtype)
    return xnp.concat([c.reshape(c.shape[0], -1) for c in columns], axis=1).T


def split_rows(matrix: Array, shapes: tuple[tuple[int, ...], ...]) -> list[Array]:
    """Return the per-parameter columns ``(k, *shape)`` of a ``(D, k)`` matrix."""
    rows, columns, offset = matrix.T, [], 0
    for shape in shapes:
        size = math.prod(shape)
        columns.append(rows[:, offset : offset + size].reshape((rows.shape[0], *shape)))
        offset += size
    return columns


@dataclass(frozen=True)
class ArrayKind:
    """What one framework's arrays look like, for checks and error messages.

    Attributes:
        types: The accepted array types.
        name: The type as the user writes it (``"torch.Tensor"``).
        conversion: How to convert foreign input (``"torch.as_tensor(np.asarray(v))"``).
        cast: ``(dtype, device) -> str``, how to cast an array to the parameters' dtype
            (and device).
        checks_device: Whether an array must sit on the parameters' device.
        all_finite: ``x -> bool`` for a concrete array: no NaN or infinite entry.
        thaw: ``x -> x'`` an array autodiff can use (torch clones inference-mode tensors).
        compiled: ``fn -> fn'``, :func:`stack_columns` and :func:`split_rows` compiled where
            that pays (JAX: one ``jit`` program per parameter shapes instead of one eager
            dispatch per parameter; ``shapes`` is static).
    """

    types: tuple[type, ...]
    name: str
    conversion: str
    cast: Callable[[Any, Any], str]
    checks_device: bool
    all_finite: Callable[[Array], bool]
    thaw: Callable[[Array], Array] = _unchanged
    compiled: Callable[[Callable[..., Any]], Callable[..., Any]] = _unchanged


class ParameterStructure(Protocol):
    """The container parameter-shaped input comes in (a list of tensors, a pytree)."""

    #: How the input looks to the user, for error messages.
    description: str

    def matches(self, v: Any) -> bool:
        """Return whether ``v`` is parameter-shaped input rather than an array."""

    def leaves(self, v: Any, shapes: Sequence[tuple[int, ...]]) -> list[Array]:
        """Return ``v``'s arrays in parameter order; ``ValueError`` when the structure differs."""

    def build(self, leaves: Sequence[Array]) -> Any:
        """Return parameter-shaped output holding ``leaves``."""


class ParameterLayout:
    """The parameters ``θ_1, …, θ_P`` of a curvature and their flat ``(D,)`` order.

    Args:
        names: A readable name per parameter (torch: module names; JAX: key paths).
        values: The parameters' current values, one array each, in flat order.
        structure: The container of parameter-shaped input and output.
        kind: The framework's arrays.
        device: The parameters' device (``None`` for traced JAX leaves).
    """

    def __init__(
        self,
        names: Sequence[str],
        values: Sequence[Array],
        structure: ParameterStructure,
        kind: ArrayKind,
        device: Any,
    ) -> None:
        self.names = list(names)
        self.shapes = [tuple(v.shape) for v in values]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.num_params = sum(self.sizes)
        self.dtype = values[0].dtype
        self.device = device
        self.structure = structure
        self.kind = kind
        self.xnp = get_library_fns(self.dtype)
        self._values = list(values)
        self._stack = kind.compiled(stack_columns)
        self._split = kind.compiled(split_rows)

    def flatten(self, columns: Sequence[Array]) -> Array:
        """Stack per-parameter columns ``(k, *θ_p.shape)`` into a ``(D, k)`` matrix."""
        return self._stack(list(columns))

    def unflatten(self, matrix: Array) -> list[Array]:
        """Split a ``(D, k)`` matrix into per-parameter columns ``(k, *θ_p.shape)``."""
        return self._split(self.kind.thaw(matrix), shapes=tuple(self.shapes))

    def vector(self) -> Array:
        """Return the parameters' current values as one flat ``(D,)`` array."""
        return self.flatten([v.reshape(1, -1) for v in self._values])[:, 0]

    def is_param_format(self, v: Any) -> bool:
        """Return whether ``v`` is parameter-shaped input, not a ``(D,)`` or ``(D, k)`` array."""
        return self.structure.matches(v)

    def columns_of(self, v: Any) -> list[Array]:
        """Return parameter-shaped input as one column ``(1, *θ_p.shape)`` per parameter.

        Raises ``ValueError`` unless ``v`` has the parameters' structure and shapes, and
        ``TypeError`` / ``ValueError`` for arrays of another framework, dtype or device.
        """
        leaves = self.structure.leaves(v, self.shapes)
        for leaf in leaves:
            self.check_array(leaf)
        return [self.kind.thaw(leaf)[None] for leaf in leaves]

    def value_of(self, columns: Sequence[Array]) -> Any:
        """Return the first column of each parameter in the parameter-shaped format."""
        return self.structure.build([c[0] for c in columns])

    def check_array(self, v: Any) -> None:
        """Raise unless ``v`` is an array of this framework with the parameters' dtype (device)."""
        kind = self.kind
        if not isinstance(v, kind.types):
            raise TypeError(
                f"expected a {kind.name}, got {type(v).__module__}.{type(v).__name__}; convert "
                f"it with {kind.conversion}."
            )
        wrong_device = kind.checks_device and v.device != self.device
        if v.dtype != self.dtype or wrong_device:
            where = f" on {self.device}" if kind.checks_device else ""
            got = f" on {v.device}" if kind.checks_device else ""
            raise ValueError(
                f"expected an array with dtype {self.dtype}{where} like the parameters, got "
                f"dtype {v.dtype}{got}; convert it with {kind.cast(self.dtype, self.device)}."
            )

    def all_finite(self, x: Array) -> bool:
        """Return whether a concrete array holds no NaN or infinite entry."""
        return self.kind.all_finite(x)

    def arrays_close(self, first: Array, second: Array) -> bool:
        """Return whether two arrays agree to ``1000 ε`` of their dtype, relative to ``second``."""
        rtol = 1e3 * float(self.xnp.finfo(first.dtype).eps)
        atol = rtol * float(self.xnp.abs(second).max())
        return bool(self.xnp.allclose(first, second, rtol=rtol, atol=atol))
