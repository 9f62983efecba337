"""Per-example gradients of output-space cotangents with ``torch.func.vmap``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import grad, vmap


def per_example_cotangent_gradients(
    model_fn: Callable[[Sequence[torch.Tensor], object], torch.Tensor],
    params: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    cotangents: torch.Tensor,
) -> torch.Tensor:
    """Return ``J_nᵀ u_{c,n}`` for every column ``c`` and example ``n``, shape ``(C', N, D)``.

    ``cotangents`` has shape ``(C', *f.shape)``. Each example runs through the model alone
    (``vmap`` over examples, so models must not mix examples, e.g. no train-mode batch
    norm), one reverse pass per column. Cost: ``C'`` gradients' worth of per-example work.
    """
    detached = [p.detach() for p in params]

    def projected_output(
        ps: Sequence[torch.Tensor], x: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        return (model_fn(ps, x[None])[0] * u).sum()

    def flat_gradient(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.flatten() for g in grad(projected_output)(detached, x, u)])

    per_column = vmap(vmap(flat_gradient, in_dims=(0, 0)), in_dims=(None, 0))
    return per_column(inputs, cotangents)
