"""Time curvature products relative to one gradient, interleaved in one process.

For each model (an MLP 784-256-256-10 with tanh and a small CNN on 3×32×32, both with
mean cross-entropy on one random batch of 128, float32) this script times one gradient
(model forward included), every operator's product with one vector and with an
8-column matrix, and plain ``torch.func``/autograd baselines (double-backward HVP,
forward-over-reverse HVP, GGN via ``jvp`` + analytic loss Hessian + ``vjp``). All
measurements run round-robin ``--repeats`` times after a warm-up, so slow phases of a
shared machine hit them alike, each timed call right after an untimed one of the same
measurement; ratios use medians (and, in parentheses, minima). Peak memory, the largest
net growth of the bytes torch allocates during one call, comes from the allocation
events of ``torch.profiler`` after the timings (``--no-memory`` skips it).

Run from the repository root (the second form works before the package is installed)::

    .venv/bin/python benchmarks/products.py --repeats 15
    .venv/bin/python -m benchmarks.products --repeats 15

It prints a Markdown table of ratios and writes raw times and ratios to
``benchmarks/results/products-<cpu>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

import cola_curvature as cc

BATCH_SIZE = 128
NUM_COLUMNS = 8
SEED = 0
MODELS = ("mlp", "cnn")
OPERATORS = {
    "Hessian": cc.Hessian,
    "GGN": cc.GGN,
    "EmpiricalFisher": cc.EmpiricalFisher,
    "FisherMC": cc.FisherMC,
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def build_problem(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Return a model and one random batch ``(X, y)``, all from fixed seeds."""
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED + 1)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        )
        X = torch.randn(BATCH_SIZE, 784, generator=generator)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 6 * 6, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
        X = torch.randn(BATCH_SIZE, 3, 32, 32, generator=generator)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}.")
    y = torch.randint(0, 10, (BATCH_SIZE,), generator=generator)
    return model, X, y


def ce_output_hessian_matmat(f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Return ``(diag(p) - p pᵀ) u / N`` per example: the mean-CE Hessian w.r.t. logits."""
    p = f.softmax(-1)
    pu = p * u
    return (pu - p * pu.sum(-1, keepdim=True)) / f.shape[0]


def measurements(name: str) -> dict[str, tuple[Callable[[], object], int]]:
    """Return ``{label: (thunk, columns)}`` for one model; ``columns`` divides the time."""
    model, X, y = build_problem(name)
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    data = [(X, y)]
    num_params = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(SEED + 2)
    v = torch.randn(num_params, generator=generator)
    V = torch.randn(num_params, NUM_COLUMNS, generator=generator)

    def gradient() -> object:
        return torch.autograd.grad(loss_func(model(X), y), params)

    thunks: dict[str, tuple[Callable[[], object], int]] = {"gradient": (gradient, 1)}
    for label, operator in OPERATORS.items():
        op = operator(model, loss_func, params, data, check_deterministic=False)
        thunks[f"{label} @ v"] = (lambda op=op: op @ v, 1)
        thunks[f"{label} @ V ({NUM_COLUMNS} col.)"] = (lambda op=op: op @ V, NUM_COLUMNS)

    names = [n for n, _ in model.named_parameters()]
    primals = tuple(p.detach() for p in params)
    sizes = [p.numel() for p in params]
    tangent = tuple(t.reshape(p.shape) for t, p in zip(v.split(sizes), params, strict=True))
    tangents = tuple(
        t.T.reshape(NUM_COLUMNS, *p.shape) for t, p in zip(V.split(sizes), params, strict=True)
    )

    def model_fn(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, ps, strict=True)), (X,))

    def loss_fn(*ps: torch.Tensor) -> torch.Tensor:
        return loss_func(model_fn(*ps), y)

    def hvp_double_backward() -> object:
        leaves = [p.detach().requires_grad_(True) for p in params]
        grads = torch.autograd.grad(loss_func(model_fn(*leaves), y), leaves, create_graph=True)
        return torch.autograd.grad(grads, leaves, tangent)

    def hvp_forward_over_reverse() -> object:
        gradient_fn = torch.func.grad(loss_fn, argnums=tuple(range(len(primals))))
        return jvp(gradient_fn, primals, tangent)[1]

    def ggn_jvp_vjp() -> object:
        f, jv = jvp(model_fn, primals, tangent)
        _, pullback = vjp(model_fn, *primals)
        return pullback(ce_output_hessian_matmat(f, jv))

    def ggn_jvp_vjp_vmap() -> object:
        def push(*ts: torch.Tensor) -> torch.Tensor:
            return jvp(model_fn, primals, ts)[1]

        f, pullback = vjp(model_fn, *primals)
        jv = vmap(push)(*tangents)
        return vmap(pullback)(ce_output_hessian_matmat(f, jv))

    thunks["torch.func HVP, double backward"] = (hvp_double_backward, 1)
    thunks["torch.func HVP, forward-over-reverse"] = (hvp_forward_over_reverse, 1)
    thunks["torch.func GGN @ v, jvp + loss Hessian + vjp"] = (ggn_jvp_vjp, 1)
    thunks[f"torch.func GGN @ V ({NUM_COLUMNS} col.), vmap"] = (ggn_jvp_vjp_vmap, NUM_COLUMNS)
    return thunks


def time_interleaved(
    thunks: dict[str, tuple[Callable[[], object], int]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Return the wall-clock times of each thunk, taken round-robin ``repeats`` times.

    Each timed call directly follows an untimed call of the same thunk: otherwise a call's
    time depends on what ran before it (the CNN gradient varied between 16 and 23 ms,
    most likely from page faults on memory just returned to the system).
    """
    labels = list(thunks)
    for _ in range(warmup):
        for label in labels:
            thunks[label][0]()
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(repeats):
        gc.collect()
        shift = r % len(labels)  # rotate the order so no measurement always follows another
        for label in labels[shift:] + labels[:shift]:
            thunk = thunks[label][0]
            thunk()
            start = time.perf_counter()
            thunk()
            times[label].append(time.perf_counter() - start)
    return times


def _profiler_nodes(nodes: list) -> list:
    """Return all nodes of the profiler's event tree, depth first."""
    result = []
    for node in nodes:
        result.append(node)
        result.extend(_profiler_nodes(node.children))
    return result


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ library logs each start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mib(thunk: Callable[[], object]) -> float | None:
    """Return the peak of the bytes allocated (net of frees) during one call, in MiB.

    Read from the allocation events of ``torch.profiler`` (``profile_memory=True``), which
    see every allocation of torch's CPU allocator; ``None`` if this torch lacks them.
    """
    try:
        from torch._C._profiler import _EventType

        profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        with _quiet_stderr(), profiler as prof:
            thunk()
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError, RuntimeError):
        return None
    events = sorted(
        (node.start_time_ns, node.typed[1].alloc_size)
        for node in _profiler_nodes(tree)
        if node.typed[0] == _EventType.Allocation
    )
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak / 2**20


def cpu_name() -> str:
    """Return the CPU model name from ``lscpu`` (or ``platform``), for file names and reports."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"^Model name:\s*(.+)$", output, flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def summarize(times: dict[str, list[float]], columns: dict[str, int]) -> dict[str, dict]:
    """Return medians, minima and ratios to the gradient (per column for matrices)."""
    gradient_median = statistics.median(times["gradient"])
    gradient_min = min(times["gradient"])
    summary = {}
    for label, values in times.items():
        k = columns[label]
        summary[label] = {
            "columns": k,
            "median_s": statistics.median(values),
            "min_s": min(values),
            "ratio_median": statistics.median(values) / k / gradient_median,
            "ratio_min": min(values) / k / gradient_min,
            "times_s": values,
        }
    return summary


def markdown_table(results: dict[str, dict], with_memory: bool) -> str:
    """Return the ratio table (median, and min in parentheses), one column per model."""
    models = list(results)
    labels = list(results[models[0]]["measurements"])
    header = "| measurement (÷ one gradient; matrices per column) | " + " | ".join(models) + " |"
    lines = [header, "| --- |" + " --- |" * len(models)]
    for label in labels:
        cells = []
        for name in models:
            entry = results[name]["measurements"][label]
            if label == "gradient":
                cells.append(f"{entry['median_s'] * 1e3:.1f} ms")
            else:
                cells.append(f"{entry['ratio_median']:.2f} ({entry['ratio_min']:.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if with_memory:
        lines += ["", "| peak memory (÷ a gradient's) | " + " | ".join(models) + " |"]
        lines.append("| --- |" + " --- |" * len(models))
        for label in labels:
            cells = []
            for name in models:
                memory = results[name]["peak_memory_mib"]
                if memory[label] is None or not memory["gradient"]:
                    cells.append("n/a")
                elif label == "gradient":
                    cells.append(f"{memory[label]:.1f} MiB")
                else:
                    cells.append(f"{memory[label] / memory['gradient']:.1f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run the interleaved timings and write the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="rounds over all measurements")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to run"
    )
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON path to write")
    args = parser.parse_args()

    results = {}
    for name in args.models:
        thunks = measurements(name)
        times = time_interleaved(thunks, args.repeats, args.warmup)
        results[name] = {
            "measurements": summarize(times, {label: k for label, (_, k) in thunks.items()})
        }
        if args.memory:
            results[name]["peak_memory_mib"] = {
                label: peak_memory_mib(thunk) for label, (thunk, _) in thunks.items()
            }
        del thunks
        gc.collect()

    cpu = cpu_name()
    table = markdown_table(results, args.memory)
    print(table)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu).strip("-").lower() or platform.node()
    output = args.output or RESULTS_DIR / f"products-{slug}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "batch_size": BATCH_SIZE,
        "columns": NUM_COLUMNS,
        "results": results,
        "table": table,
    }
    output.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
