"""Compile time and steady-state cost of ``compile=True`` products, in gradients.

Run ``python -m benchmarks.compiled_products --models mlp cnn transformer`` from the
repository root. Per model it times one gradient (``torch.autograd.grad``), then ``GGN @ v``
and ``Hessian @ v`` with ``compile=False`` and ``compile=True`` in alternating rounds (the
machine may be loaded: each round's times are divided by that round's gradient), and
reports the first compiled product's wall time (the compilation) and the median ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import cola_curvature as cc
from benchmarks.workloads import torch_problem


def median_seconds(thunk: Callable[[], object], repeats: int) -> float:
    """Return the median wall time of ``repeats`` calls of ``thunk``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        thunk()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, rounds: int, repeats: int) -> dict[str, float]:
    """Return compile times (s) and median ratios to one gradient for model ``name``."""
    model, X, y = torch_problem(name)
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    data = [(X, y)]
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))

    def gradient() -> object:
        return torch.autograd.grad(loss_func(model(X), y), params)

    thunks, result = {}, {}
    for label, operator in (("GGN", cc.GGN), ("Hessian", cc.Hessian)):
        for compiled in (False, True):
            op = operator(
                model, loss_func, params, data, check_deterministic=False, compile=compiled
            )
            start = time.perf_counter()
            op @ v
            if compiled:
                result[f"{label} compile s"] = time.perf_counter() - start
            thunks[f"{label} @ v" + (" (compiled)" if compiled else "")] = lambda op=op: op @ v
    ratios: dict[str, list[float]] = {key: [] for key in thunks}
    for _ in range(rounds):
        unit = median_seconds(gradient, repeats)
        for key, thunk in thunks.items():
            ratios[key].append(median_seconds(thunk, repeats) / unit)
        result.setdefault("gradient ms", unit * 1e3)
    result.update({key: statistics.median(values) for key, values in ratios.items()})
    return result


def main() -> None:
    """Print one line per model."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        result = measure(name, args.rounds, args.repeats)
        print(name, ", ".join(f"{key}: {value:.2f}" for key, value in result.items()), flush=True)


if __name__ == "__main__":
    main()
