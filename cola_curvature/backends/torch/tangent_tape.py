"""The tangent tape: the operations of a dual forward pass that read a forward-mode tangent.

:class:`_TangentTape` tapes them below autograd (a ``TorchDispatchMode``) while the pass
runs for the first column; the :class:`_TangentProgram` it returns replays them for the
other columns' tangents without the primal operations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

#: Operations on tangents whose non-tensor results depend on shapes only (the same for
#: every column); any other non-tensor result stops the tape.
_SHAPE_ONLY_OPS = frozenset(
    {torch.ops.aten.is_same_size.default, torch.ops.aten._has_same_storage_numel.default}
)


def _has_tensor_in(values: Iterable[Any], slot_of: dict[int, int]) -> bool:
    """Return whether ``values`` (or a list among them) holds a tensor taped in ``slot_of``."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if id(value) in slot_of:
                return True
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor) and id(item) in slot_of:
                    return True
    return False


def _written_arguments(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list[Any]:
    """Return the arguments ``func`` writes into (per its schema's alias annotations)."""
    written = []
    for i, argument in enumerate(func._schema.arguments):
        info = argument.alias_info
        if info is not None and info.is_write:
            written.append(args[i] if i < len(args) else kwargs.get(argument.name))
    return written


class _TangentProgram:
    """The taped operations that map the input tangents to the output tangents."""

    def __init__(
        self,
        steps: list[tuple],
        num_slots: int,
        num_inputs: int,
        output_slots: list[int],
        largest_bytes: int,
    ) -> None:
        #: Size of the largest taped tensor, in bytes.
        self.largest_bytes = largest_bytes
        self._num_slots = num_slots
        self._num_inputs = num_inputs
        self._output_slots = output_slots
        last_use: dict[int, int] = {}
        for index, (_, _, _, refs, out_slots) in enumerate(steps):
            for _, slot in refs:
                last_use[slot] = index
            for slot in out_slots:
                if slot is not None:
                    last_use[slot] = index
        frees: list[list[int]] = [[] for _ in steps]
        for slot, index in last_use.items():
            if slot not in output_slots:
                frees[index].append(slot)
        self._steps = [(*step, free) for step, free in zip(steps, frees, strict=True)]

    def replay(self, tangents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return the output tangents for new input ``tangents`` (laid out as the taped ones)."""
        env: list[Any] = [None] * self._num_slots
        env[: self._num_inputs] = tangents
        for func, spec, flat, refs, out_slots, free in self._steps:
            values = list(flat)
            for position, slot in refs:
                values[position] = env[slot]
            args, kwargs = tree_unflatten(values, spec)
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                env[out_slots[0]] = out
            else:
                for value, slot in zip(tree_flatten(out)[0], out_slots, strict=True):
                    if slot is not None:
                        env[slot] = value
            for slot in free:
                env[slot] = None
        return [env[s] for s in self._output_slots]


class _TangentTape(TorchDispatchMode):
    """Tape, below autograd, every operation that reads a forward-mode tangent.

    The operations of a dual forward pass split into primal ones, which never read a
    tangent, and tangent ones. Starting from the input tangents, an operation that reads a
    taped tensor is taped with its other arguments held as constants, and its outputs are
    taped in turn. Replaying the tape for other input tangents gives the same output
    tangents as a fresh dual pass, bit for bit, without the primal operations. The tape
    gives up (and callers fall back to dual passes) when a tangent operation writes into
    a constant, returns a value that is not a tensor (``.item()``, data-dependent
    branches), or when a constant is modified in place after being read.
    """

    def __init__(self, tangents: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self._slot_of = {id(t): i for i, t in enumerate(tangents)}
        self._alive: list[torch.Tensor] = list(tangents)  # keeps ids unique while taping
        self._num_inputs = len(tangents)
        self._steps: list[tuple] = []
        self._constants: list[tuple[torch.Tensor, int]] = []
        self._failure: str | None = None
        self._largest_bytes = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        """Run ``func`` and tape it when it reads a taped tensor."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._failure is None and (
            _has_tensor_in(args, self._slot_of) or _has_tensor_in(kwargs.values(), self._slot_of)
        ):
            self._tape(func, args, kwargs, out)
        return out

    def _tape(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Append one tangent operation to the tape (or record why taping must stop)."""
        slot_of = self._slot_of
        for value in _written_arguments(func, args, kwargs):
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, torch.Tensor) and id(v) not in slot_of for v in values):
                self._failure = f"{func} writes a tangent into a tensor without one"
                return
        outputs, _ = tree_flatten(out)
        if any(not isinstance(o, torch.Tensor) and o is not None for o in outputs):
            if func not in _SHAPE_ONLY_OPS:
                self._failure = f"{func} returns a value that is not a tensor"
            return
        flat, spec = tree_flatten((args, kwargs))
        refs = []
        for position, value in enumerate(flat):
            if isinstance(value, torch.Tensor):
                slot = slot_of.get(id(value))
                if slot is None:
                    self._constants.append((value, value._version))
                else:
                    refs.append((position, slot))
                    flat[position] = None
        out_slots: list[int | None] = []
        for value in outputs:
            if value is None:
                out_slots.append(None)
                continue
            self._largest_bytes = max(self._largest_bytes, value.numel() * value.element_size())
            slot = slot_of.get(id(value))
            if slot is None:
                slot = len(self._alive)
                slot_of[id(value)] = slot
                self._alive.append(value)
            out_slots.append(slot)
        self._steps.append((func, spec, flat, refs, out_slots))

    def program(self, outputs: Sequence[torch.Tensor]) -> _TangentProgram | None:
        """Return the replayable program for ``outputs``, or ``None`` if taping failed."""
        output_slots = [self._slot_of.get(id(o)) for o in outputs]
        valid = (
            self._failure is None
            and all(s is not None for s in output_slots)
            and all(t._version == version for t, version in self._constants)
        )
        num_slots = len(self._alive)
        self._alive, self._slot_of, self._constants = [], {}, []
        if not valid:
            return None
        return _TangentProgram(
            self._steps, num_slots, self._num_inputs, output_slots, self._largest_bytes
        )
