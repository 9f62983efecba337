"""Time KFAC / EKFAC builds and the damped-KFAC inverse relative to one gradient.

Same models as ``benchmarks/products.py`` (MLP 784-256-256-10 tanh and the small CNN on
3×32×32, mean cross-entropy, one batch of 128, float32). Measurements run round-robin
``--repeats`` times after a warm-up; each ratio is a median time divided by the median
time of one gradient (model forward included) taken in the same rounds. The inverse apply
is ``cola.linalg.inv(K + λI) @ v`` with the factors' eigendecompositions cached (built
once outside the timing), as an optimizer would use it between refreshes.

Run from the repository root (the script imports ``benchmarks/products.py`` beside it)::

    .venv-ci/bin/python benchmarks/kfac.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cola
import torch
from products import build_problem  # the sibling script: same models and batch
from torch import nn

import cola_curvature as cc

DAMPING = 1e-3


def measurements(name: str) -> dict[str, Callable[[], object]]:
    """Return the timed callables for one model."""
    model, X, y = build_problem(name)
    model.eval()
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    data = [(X, y)]

    def gradient() -> object:
        return torch.autograd.grad(loss_func(model(X), y), params)

    def build(operator: type, fisher_type: str) -> Callable[[], object]:
        return lambda: operator(
            model, loss_func, params, data, fisher_type=fisher_type, check_deterministic=False
        )

    kfac = cc.KFAC(model, loss_func, params, data, check_deterministic=False)
    inverse = cola.linalg.inv(kfac + DAMPING * cola.ops.I_like(kfac))
    v = torch.randn(kfac.shape[0], generator=torch.Generator().manual_seed(1))
    inverse @ v
    timed: dict[str, Callable[[], object]] = {"gradient": gradient}
    for fisher_type in ("type-2", "mc", "empirical", "forward-only"):
        timed[f"KFAC build {fisher_type}"] = build(cc.KFAC, fisher_type)
    timed["EKFAC build type-2"] = build(cc.EKFAC, "type-2")
    timed["EKFAC build empirical"] = build(cc.EKFAC, "empirical")
    timed["KFAC inverse @ v (cached)"] = lambda: inverse @ v
    timed["KFAC inverse incl. eigh"] = lambda: (
        cola.linalg.inv(
            cc.KFAC(model, loss_func, params, data, check_deterministic=False).damped(DAMPING)
        )
        @ v
    )
    return timed


def run(name: str, repeats: int) -> dict[str, float]:
    """Return the median time of every measurement of model ``name``, interleaved."""
    timed = measurements(name)
    for fn in timed.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in timed}
    for _ in range(repeats):
        for key, fn in timed.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    """Run the benchmark and print a Markdown table of ratios to one gradient."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    args = parser.parse_args()
    results = {name: run(name, args.repeats) for name in args.models}
    keys = list(next(iter(results.values())))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print("| measurement (÷ one gradient) | " + " | ".join(args.models) + " |")
    print("| --- |" + " --- |" * len(args.models))
    for key in keys[1:]:
        ratios = [results[name][key] / results[name]["gradient"] for name in args.models]
        print(f"| {key} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    gradient_ms = [f"{1e3 * results[name]['gradient']:.1f} ms" for name in args.models]
    print("| (one gradient) | " + " | ".join(gradient_ms) + " |")
    out = Path(__file__).parent / "results" / "kfac.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
