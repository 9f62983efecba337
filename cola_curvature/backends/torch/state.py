"""Guards that keep the user's RNG state untouched, and private seeded random sources."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
from plum import dispatch

#: Held while curvature work runs the model: torch's forward-mode AD level is process-wide
#: (two threads would nest it), ``functional_call`` swaps a module's parameters for the
#: duration of a call (another thread would see, and could leave behind, the swapped-in
#: tensors), and the RNG guards save and restore global state. Re-entrant, since
#: operators nest these regions (counting the data inside a build).
CURVATURE_LOCK = threading.RLock()


@contextmanager
def preserved_global_state(device: torch.device) -> Iterator[None]:
    """Run curvature work alone and leave global state as it was; enable autodiff inside.

    Holds :data:`CURVATURE_LOCK`, so products from several threads (on one operator or
    several sharing a model) run one at a time and each gives its serial result. Restores
    torch's, NumPy's and Python's global RNG states on exit: data loaders with shuffling
    draw from torch's global generator and models in train mode (dropout) consume it; both
    must leave no trace on the user's side. Reverse and forward mode are switched on
    inside, since callers such as CoLA's iterative solvers run products within
    ``torch.no_grad()``, ``torch.inference_mode()`` or a custom ``autograd.Function``,
    where dual tensors would silently carry no tangent.
    """
    with CURVATURE_LOCK, _restored_global_state(device):
        yield


@contextmanager
def _restored_global_state(device: torch.device) -> Iterator[None]:
    """Restore the global RNG states on exit; enable reverse and forward mode inside."""
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


# a method of cola_curvature.matfree._random.seeded_random_source (plum's global dispatcher
# joins methods by name, so the algorithms and this backend need not import each other)
@dispatch
def seeded_random_source(like: torch.Tensor, seed: Any) -> TorchRandom:
    """Return a :class:`TorchRandom` seeded with ``seed`` on the device of ``like``."""
    return TorchRandom(seed, like.device)


def _signed(constant: int) -> int:
    """Return the int64 with the bits of the unsigned 64-bit ``constant``."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX_1 = _signed(0xBF58476D1CE4E5B9)
_MIX_2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Return the logical right shift ``x >>> bits`` of int64 bit patterns."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """Return SplitMix64's finaliser of ``z``: a bijection of 64-bit words (wrapping int64)."""
    z = (z ^ _shift_right(z, 30)) * _MIX_1
    z = (z ^ _shift_right(z, 27)) * _MIX_2
    return z ^ _shift_right(z, 31)


def _absorb(state: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Return ``mix(state + (value + 1) · γ)``: distinct ``value`` give distinct states."""
    return _mix(state + (value + 1) * _GOLDEN)


class TorchExampleRandom:
    """Counter-based random numbers keyed by each example's global index (global RNG untouched).

    A draw has shape ``(M, N, *entry)`` (sample, example of the batch, entry; see
    :class:`~cola_curvature.losses.RandomSource`). Its entry ``[m, n, j]`` (``j`` the flat
    entry index) is a SplitMix64 hash of ``(seed, draw, first_example + n, m, j)``, computed
    with vectorised int64 operations; ``draw`` counts this source's calls. An example's
    numbers depend on the seed and its global index only, never on the batch it is in.
    Uniforms keep the top ``p`` bits of a hash (``p`` the dtype's significand precision),
    normals come from two uniforms by Box–Muller.

    Args:
        seed: Seed of the streams.
        first_example: Global index of the batch's first example.

    """

    def __init__(self, seed: int, first_example: int) -> None:
        self._seed = _signed(int(seed) % (1 << 64))
        self._first_example = first_example
        self._draws = 0

    def _hashes(self, shape: tuple[int, ...], streams: int, device: torch.device) -> torch.Tensor:
        """Return ``streams`` 64-bit hashes per entry of ``shape``, shape ``(*shape, streams)``."""
        num_samples, num_examples = shape[0], shape[1]
        entries = math.prod(shape[2:]) * streams
        draw = torch.tensor(self._draws, dtype=torch.int64, device=device)
        self._draws += 1
        state = _absorb(_mix(torch.full_like(draw, self._seed)), draw)
        examples = torch.arange(num_examples, dtype=torch.int64, device=device)
        state = _absorb(state, self._first_example + examples)
        samples = torch.arange(num_samples, dtype=torch.int64, device=device)
        state = _absorb(state[None, :, None], samples[:, None, None])
        state = _absorb(state, torch.arange(entries, dtype=torch.int64, device=device))
        return state.reshape(*shape, streams)

    def _uniform(self, hashes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Return ``⌊h / 2^(64 - p)⌋ · 2^-p`` in ``[0, 1)``, exact in ``dtype``."""
        bits = 1 - round(math.log2(torch.finfo(dtype).eps))
        return _shift_right(hashes, 64 - bits).to(dtype) * 2.0**-bits

    def uniform(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Return samples from U[0, 1) with dtype and device of ``like``."""
        hashes = self._hashes(shape, 1, like.device)
        return self._uniform(hashes, like.dtype).reshape(shape)

    def normal(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Return ``√(-2 log(1 - u₁)) cos(2π u₂)`` ~ N(0, 1) with dtype and device of ``like``."""
        u = self._uniform(self._hashes(shape, 2, like.device), like.dtype)
        radius = torch.sqrt(-2 * torch.log1p(-u[..., 0]))
        return radius * torch.cos(2 * math.pi * u[..., 1])
