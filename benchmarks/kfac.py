"""Time KFAC / EKFAC builds and the damped-KFAC inverse relative to one gradient.

Same models as ``benchmarks/products.py`` (MLP 784-256-256-10 tanh and the small CNN on
3×32×32, mean cross-entropy, one batch of 128, float32). Measurements run round-robin
``--repeats`` times after a warm-up; each ratio is a median time divided by the median
time of one gradient (model forward included) taken in the same rounds. The inverse apply
is ``cola.linalg.inv(K + λI) @ v`` (exact damping) or of the π-heuristically damped KFAC,
with the factors' eigendecompositions cached (built once outside the timing), as an
optimizer would use it between refreshes. The same builds and inverses of curvlinops
(``KFACLinearOperator``, ``EKFACLinearOperator``, ``KFACInverseLinearOperator`` with exact
or heuristic damping) run in the same rounds. ``--threads 1`` runs torch on one thread and
times the thread's CPU time (``time.thread_time``), robust to other processes on the machine.

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
import curvlinops
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
    heuristic = cola.linalg.inv(kfac.damped(DAMPING, mode="heuristic"))
    heuristic @ v
    timed["KFAC inverse @ v (cached)"] = lambda: inverse @ v
    timed["KFAC inverse @ v heuristic (cached)"] = lambda: heuristic @ v
    timed["KFAC inverse incl. eigh"] = lambda: (
        cola.linalg.inv(
            cc.KFAC(model, loss_func, params, data, check_deterministic=False).damped(DAMPING)
        )
        @ v
    )
    timed.update(curvlinops_measurements(model, loss_func, params, data, v))
    return timed


def curvlinops_measurements(
    model: nn.Module, loss_func: nn.Module, params: list, data: list, v: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """Return curvlinops' KFAC / EKFAC builds and KFAC inverse products, labelled as ours."""
    options = {"check_deterministic": False}

    def build(fisher_type: str) -> Callable[[], object]:
        def thunk() -> object:
            kfac = curvlinops.KFACLinearOperator(
                model, loss_func, params, data, fisher_type=fisher_type, **options
            )
            kfac.compute_kronecker_factors()
            return kfac

        return thunk

    def build_ekfac() -> object:
        ekfac = curvlinops.EKFACLinearOperator(
            model, loss_func, params, data, fisher_type="type-2", **options
        )
        ekfac.compute_eigenvalue_correction()
        return ekfac

    timed = {f"curvlinops KFAC build {t}": build(t) for t in ("type-2", "mc", "empirical")}
    timed["curvlinops EKFAC build type-2"] = build_ekfac
    kfac = build("type-2")()
    for label, damping in (("", "use_exact_damping"), (" heuristic", "use_heuristic_damping")):
        inverse = curvlinops.KFACInverseLinearOperator(kfac, damping=DAMPING, **{damping: True})
        inverse @ v
        timed[f"curvlinops KFAC inverse @ v{label} (cached)"] = lambda inverse=inverse: inverse @ v
    return timed


def run(name: str, repeats: int) -> dict[str, float]:
    """Return the median time of every measurement of model ``name``, interleaved."""
    timed = measurements(name)
    for fn in timed.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in timed}
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for _ in range(repeats):
        for key, fn in timed.items():
            start = clock()
            fn()
            times[key].append(clock() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    """Run the benchmark and print a Markdown table of ratios to one gradient."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
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
