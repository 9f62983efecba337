"""Combining partial curvature results over the ranks of a ``torch.distributed`` process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


class TorchProcessGroup:
    """The default ``torch.distributed`` process group, as the operators combine over it.

    Built by :meth:`check`, which raises unless the group is initialised.
    """

    @classmethod
    def check(cls) -> TorchProcessGroup:
        """Return the group; ``RuntimeError`` unless the default process group is initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed=True needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group(...) first (torchrun sets up the environment "
                "it reads), or leave distributed=False for data held by this process alone."
            )
        return cls()

    def gather_counts(self, count: int) -> list[int]:
        """Return every rank's ``count`` (``all_gather`` of one integer)."""
        local = torch.tensor([count], dtype=torch.int64)
        counts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, local)
        return [int(c.item()) for c in counts]

    def rank(self) -> int:
        """Return this process's rank in the default process group."""
        return dist.get_rank()

    def check_same_parameters(self, vector: torch.Tensor) -> None:
        """Raise ``ValueError`` on every rank unless all ranks hold rank 0's parameter values."""
        reference = vector.clone()
        dist.broadcast(reference, src=0)
        differs = torch.tensor(
            [0.0 if torch.equal(vector, reference) else 1.0], dtype=torch.float64
        )
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
        if differs.item() > 0:
            raise ValueError(
                "the parameter values differ across ranks; every rank must hold the same model "
                "(e.g. load the same checkpoint, or broadcast from rank 0) before building a "
                "distributed curvature."
            )

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Return ``partial`` summed over all ranks (``all_reduce``, on a copy)."""
        total = partial.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total
