"""Time and size curvature products and KFAC builds against one gradient and against curvlinops.

For each model of ``benchmarks/workloads.py`` (MLP, small CNN, transformer block) the harness
measures, in torch: one gradient (forward included); our and curvlinops' Hessian, GGN,
empirical Fisher and MC Fisher times one vector and times 8 columns; hand-written
``torch.func``/autograd baselines; KFAC builds for every ``fisher_type``, the EKFAC build and
the damped-KFAC inverse applied to a vector with the factors' eigendecompositions cached,
ours and curvlinops'. In JAX (jit, float32, same weights and batch): the gradient, our four
operators times a vector and 8 columns, plain ``jax`` HVP and GGN products, and our KFAC rows
when ``cc.KFAC`` runs on JAX models.

Processes: each (model, framework) pair runs in its own worker subprocess
(``--worker``), one after the other, so no model's allocations, caches or thread pools (XLA
keeps its own) touch another's timings. Inside a worker, all measurements run round-robin
``--repeats`` times after ``--warmup`` rounds, the order rotated every round, each timed
call right after an untimed call of the same measurement (see RESULTS.md for why); ratios
are median ÷ median of the gradient from the same rounds.

FLOPs (torch rows): the floating-point operations of one call's matrix products and
convolutions, counted below autograd (``measurements.torch_flops``); their ratio to the
gradient's is the arithmetic floor of a time ratio on a compute-bound model.

Peak memory, measured in the same worker after the timings, one call per measurement:
torch: the largest net growth of the bytes torch's CPU allocator holds during the call,
from ``torch.profiler``'s allocation events. These count only what the call allocates, so
they need no fresh process per measurement (which would cost an interpreter start and
imports per row, minutes in all), and unlike the process's resident set they are not
swamped by the hundreds of MiB that importing torch and JAX takes. JAX: XLA's buffer
assignment of the compiled program (temporaries plus outputs, from
``Compiled.memory_analysis()``, our operators compiled with their construction inside
``jit``): what XLA plans to hold at once, not a measured peak; JAX's CPU client exposes no
allocator statistics.

Run from the repository root (``make bench`` does this with the default options)::

    .venv-ci/bin/python -m benchmarks.harness            # all models, ~7 min when idle
    .venv-ci/bin/python -m benchmarks.harness --quick    # 2 rounds, small memory pass

It writes ``benchmarks/results/harness.json`` (raw times, ratios and memory),
``benchmarks/results/harness.png`` (bar chart), and the generated section of
``benchmarks/RESULTS.md`` between its marker comments.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from benchmarks.workloads import ALL_MODELS, MODELS

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
FRAMEWORKS = ("torch", "jax")


def time_interleaved(thunks: dict[str, object], repeats: int, warmup: int) -> dict[str, list]:
    """Return the wall-clock times of each thunk, taken round-robin ``repeats`` times.

    Each timed call directly follows an untimed call of the same thunk: otherwise a call's
    time depends on what ran before it (the CNN gradient varied between 16 and 23 ms,
    most likely from page faults on memory just returned to the system).
    """
    labels = list(thunks)
    for _ in range(warmup):
        for label in labels:
            thunks[label]()
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(repeats):
        gc.collect()
        shift = r % len(labels)  # rotate the order so no measurement always follows another
        for label in labels[shift:] + labels[:shift]:
            thunk = thunks[label]
            thunk()
            start = time.perf_counter()
            thunk()
            times[label].append(time.perf_counter() - start)
    return times


def run_worker(framework: str, model: str, args: argparse.Namespace) -> dict:
    """Measure one model in one framework (in this process) and return the raw record."""
    import torch

    from benchmarks import measurements

    if args.threads:
        torch.set_num_threads(args.threads)
    kfac_missing = None
    if framework == "torch":
        rows = measurements.torch_measurements(model)
    else:
        rows, kfac_missing = measurements.jax_measurements(model)
    if args.select:
        pattern = re.compile(args.select)
        rows = [row for row in rows if row.row == "gradient" or pattern.search(row.row)]
    thunks = {f"{row.impl}|{row.row}": row.thunk for row in rows}
    times = time_interleaved(thunks, args.repeats, args.warmup)
    record: dict = {"framework": framework, "model": model, "kfac_missing": kfac_missing}
    entries = {}
    for row in rows:
        values = times[f"{row.impl}|{row.row}"]
        entries[f"{row.impl}|{row.row}"] = {
            "row": row.row,
            "impl": row.impl,
            "columns": row.columns,
            "median_s": statistics.median(values),
            "min_s": min(values),
            "times_s": values,
        }
    for row in rows:
        wanted = args.memory == "all" or (
            args.memory == "ours" and (row.impl == "ours" or row.row == "gradient")
        )
        if wanted and row.memory is not None:
            entries[f"{row.impl}|{row.row}"]["peak_mib"] = row.memory()
    if framework == "torch":
        for row in rows:
            entries[f"{row.impl}|{row.row}"]["flops"] = measurements.torch_flops(row.thunk)
    record["measurements"] = entries
    return record


def cpu_name() -> str:
    """Return the CPU model name from ``lscpu`` (or ``platform``), for the report."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"^Model name:\s*(.+)$", output, flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    """Return the installed version of ``package``, or ``"absent"``."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _worker_env(threads: int | None) -> dict[str, str]:
    """Return the environment of a worker: XLA held to one thread when ``threads == 1``."""
    env = dict(os.environ)
    if threads == 1:
        flag = "--xla_cpu_multi_thread_eigen=false"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env


def _worker_command(framework: str, model: str, args: argparse.Namespace, path: Path) -> list:
    """Return the command line of one worker subprocess."""
    command = [sys.executable, "-m", "benchmarks.harness", "--worker", framework]
    command += ["--models", model, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    command += ["--memory", args.memory, "--worker-output", str(path)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.select:
        command += ["--select", args.select]
    return command


def run_all(args: argparse.Namespace) -> dict:
    """Run every (model, framework) worker in turn and return the combined record."""
    start = time.perf_counter()
    models: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            models[model] = {}
            for framework in args.frameworks:
                print(f"[harness] {model} / {framework} ...", flush=True)
                if args.in_process:
                    models[model][framework] = run_worker(framework, model, args)
                    continue
                path = Path(tmp) / f"{model}-{framework}.json"
                subprocess.run(
                    _worker_command(framework, model, args, path),
                    cwd=ROOT,
                    env=_worker_env(args.threads),
                    check=True,
                )
                models[model][framework] = json.loads(path.read_text())
    return {
        "command": " ".join(["python -m benchmarks.harness", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - start,
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
        "versions": {
            name: _version(name) for name in ("torch", "jax", "curvlinops-for-pytorch", "cola-ml")
        },
        "python": platform.python_version(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "memory": args.memory,
        "models": models,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` sets few rounds and a small memory pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=list(MODELS))
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    parser.add_argument(
        "--memory",
        choices=("all", "ours", "none"),
        default=None,
        help="peak memory of every row, of the gradient and our rows only, or none",
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds, no warm-up round, memory of ours only"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch (and XLA, if 1) threads")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="JSON and PNG go here")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help="Markdown to update")
    parser.add_argument(
        "--select", default=None, help="regular expression: measure only matching rows"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="an earlier harness.json: the tables show our numbers as before → after",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the workers in this process (no isolation; for the harness's own test)",
    )
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"repeats": 2, "warmup": 0, "memory": "ours"}
    default = {"repeats": 5, "warmup": 1, "memory": "all"}
    for key in quick:
        if getattr(args, key) is None:
            setattr(args, key, (quick if args.quick else default)[key])
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the workers (or, with ``--worker``, one of them) and write JSON, chart and table."""
    args = parse_args(argv)
    if args.worker:
        record = run_worker(args.worker, args.models[0], args)
        args.worker_output.write_text(json.dumps(record))
        return
    from benchmarks import report

    record = run_all(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "harness.json"
    png_path = args.output_dir / "harness.png"
    report.add_ratios(record)
    json_path.write_text(json.dumps(record, indent=1))
    report.bar_chart(record, png_path)
    baseline = None if args.baseline is None else json.loads(args.baseline.read_text())
    section = report.markdown(record, args.results_md.parent, json_path, png_path, baseline)
    report.splice(args.results_md, section)
    print(section)
    print(f"\n[harness] {record['wall_s']:.0f} s; wrote {json_path}, {png_path}, {args.results_md}")


if __name__ == "__main__":
    main()
