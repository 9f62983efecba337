"""Guards that keep the user's RNG state untouched, and a private seeded random source."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.autograd.forward_ad as fwad


@contextmanager
def preserved_global_state(device: torch.device) -> Iterator[None]:
    """Restore torch's, NumPy's and Python's global RNG states on exit; enable autodiff inside.

    Data loaders with shuffling draw from torch's global generator and models in train
    mode (dropout) consume it; both must leave no trace on the user's side. Reverse and
    forward mode are switched on inside, since callers such as CoLA's iterative solvers
    run products within ``torch.no_grad()``, ``torch.inference_mode()`` or a custom
    ``autograd.Function``, where dual tensors would silently carry no tangent.
    """
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    devices = [device] if device.type == "cuda" else []
    try:
        with (
            torch.random.fork_rng(devices=devices),
            torch.inference_mode(False),
            torch.enable_grad(),
            fwad._set_fwd_grad_enabled(True),
        ):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class TorchRandom:
    """Seeded random numbers from a private ``torch.Generator`` (global RNG untouched)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)

    def uniform(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Return samples from U[0, 1) with dtype and device of ``like``."""
        return torch.rand(shape, generator=self._generator, dtype=like.dtype, device=like.device)

    def normal(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Return samples from N(0, 1) with dtype and device of ``like``."""
        return torch.randn(shape, generator=self._generator, dtype=like.dtype, device=like.device)
