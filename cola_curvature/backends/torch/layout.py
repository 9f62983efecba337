"""The parameter layout of a torch model: tensors, and a list of tensors shaped like params."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cola_curvature.parameter_layout import ArrayKind, ParameterLayout


def _thawed(x: torch.Tensor) -> torch.Tensor:
    """Return ``x``, cloned if it was made under ``torch.inference_mode()`` (autodiff needs it)."""
    if not x.is_inference():
        return x
    with torch.inference_mode(False):
        return x.clone()


def _all_finite(x: torch.Tensor) -> bool:
    """Return whether ``x`` has no NaN or infinite entry.

    A NaN or infinite entry makes the sum NaN or infinite, so a finite sum proves ``x``
    finite in one reduction: 33 µs against 0.7 ms for ``isfinite(x).all()`` on 270k float32
    entries (one thread), which is about half a gradient of the benchmark MLP, paid by every
    product's input check. A non-finite sum (also one that merely overflows) is decided
    entry by entry.
    """
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


#: torch tensors on the parameters' device.
TENSORS = ArrayKind(
    types=(torch.Tensor,),
    name="torch.Tensor",
    conversion="torch.as_tensor(np.asarray(v))",
    cast=lambda dtype, device: f"v.to(dtype={dtype}, device='{device}')",
    checks_device=True,
    all_finite=_all_finite,
    thaw=_thawed,
)


class TensorList:
    """Parameter-shaped input of a torch model: a list (or tuple) of tensors."""

    description = "a list of tensors shaped like params"

    def matches(self, v: Any) -> bool:
        """Return whether ``v`` is a list or tuple."""
        return isinstance(v, (list, tuple))

    def leaves(self, v: Sequence[Any], shapes: Sequence[tuple[int, ...]]) -> list[Any]:
        """Return the tensors of ``v`` after checking their number and shapes."""
        got = [tuple(getattr(t, "shape", ())) for t in v]
        if len(v) != len(shapes) or got != list(shapes):
            raise ValueError(
                f"parameter-shaped input must be {len(shapes)} tensors of shapes "
                f"{list(shapes)}, got {len(v)} of shapes {got}."
            )
        return list(v)

    def build(self, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Return the tensors as a list."""
        return list(leaves)


def tensor_layout(names: Sequence[str], params: Sequence[torch.Tensor]) -> ParameterLayout:
    """Return the layout of ``params`` (one dtype and device), values read without a graph."""
    values = [p.detach() for p in params]
    return ParameterLayout(names, values, TensorList(), TENSORS, params[0].device)
