"""Accuracy of the randomized estimators versus the number of matrix-vector products.

Measures, on the GGN of a small tanh MLP (20-40-40-10, float64, mean cross-entropy,
random inputs and labels from ``torch.manual_seed(0)``), the median relative error over
seeds of

* the trace: ``Hutchinson``, ``HutchPlusPlus`` and ``XTrace``;
* the diagonal: ``Hutchinson`` and ``XDiag`` (error ``‖est − exact‖₂ / ‖exact‖₂``);
* the log-determinant of ``GGN + λI`` by ``SLQ`` on a grid of probes (5, 10, 20, 40) ×
  Lanczos steps (5, 10, 30), i.e. ``probes · steps`` products, for ``λ = 1e-2`` and
  ``λ = 1`` (fewer seeds, ``--slq-seeds``: SLQ is most of the run time);

against exact references from the dense GGN (``G @ I``). Two problems: ``N=64`` examples
(GGN rank ≤ 576 of D = 2890) and ``N=8`` examples (rank ≤ 72, strongly low-rank, where
Hutch++ and XTrace should be far ahead of Hutchinson). Each estimate also gets a bias
check: the mean signed error over seeds divided by its standard error.

Run from the repository root::

    .venv-ci/bin/python benchmarks/estimators.py

It writes ``benchmarks/results/estimators.json`` and ``benchmarks/results/estimators.png``
(``--out`` changes the folder) and prints Markdown tables. Torch runs on one thread
(``--threads``): on a shared 2-core machine two threads made products up to 30× slower.
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
import matplotlib
import torch
from torch import nn

import cola_curvature as cc

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)

DTYPE = torch.float64
BUDGETS = [12, 24, 48, 96, 192]
PROBLEMS = {"N=64": 64, "N=8": 8}
DAMPINGS = [1e-2, 1.0]
SLQ_PROBES = [5, 10, 20, 40]
SLQ_STEPS = [5, 10, 30]
TRACE_METHODS: dict[str, Callable[..., cola.linalg.Algorithm]] = {
    "Hutchinson": cc.Hutchinson,
    "Hutch++": cc.HutchPlusPlus,
    "XTrace": cc.XTrace,
}
DIAG_METHODS: dict[str, Callable[..., cola.linalg.Algorithm]] = {
    "Hutchinson": cc.Hutchinson,
    "XDiag": cc.XDiag,
}


def build_problem(num_examples: int) -> tuple[cola.ops.LinearOperator, torch.Tensor]:
    """Return the matrix-free GGN of the MLP on ``num_examples`` examples and its dense form.

    The model and the 64-example batch are drawn after ``torch.manual_seed(0)``; the first
    ``num_examples`` examples are used, so both problems share the parameters.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 10)
    ).to(DTYPE)
    X = torch.randn(64, 20, dtype=DTYPE)[:num_examples]
    y = torch.randint(0, 10, (64,))[:num_examples]
    G = cc.GGN(
        model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)], check_deterministic=False
    )
    dense = G @ torch.eye(G.shape[0], dtype=DTYPE)
    return G, dense


def summarize(estimates: list[float], errors: list[float], exact: float) -> dict[str, float]:
    """Return the median relative error and the bias z-score of scalar estimates.

    The z-score is ``(mean − exact) / (std / √n)`` over the seeds; ``|z| ≳ 4`` flags a bias.
    """
    mean = statistics.fmean(estimates)
    spread = statistics.stdev(estimates) if len(estimates) > 1 else float("nan")
    standard_error = spread / len(estimates) ** 0.5
    if abs(mean - exact) <= 1e-10 * abs(exact):  # exact up to rounding (e.g. rank < m/2)
        z = 0.0
    else:
        z = (mean - exact) / standard_error
    return {
        "median_rel_error": statistics.median(errors),
        "mean_estimate": mean,
        "bias_z": z,
    }


def trace_sweep(
    G: cola.ops.LinearOperator, exact: float, seeds: int
) -> dict[str, dict[int, dict[str, float]]]:
    """Return, per trace method and budget, the error summary over ``seeds`` seeds."""
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name, method in TRACE_METHODS.items():
        results[name] = {}
        for budget in BUDGETS:
            estimates = [
                float(cola.linalg.trace(G, alg=method(num_matvecs=budget, seed=seed)))
                for seed in range(seeds)
            ]
            errors = [abs(e - exact) / abs(exact) for e in estimates]
            results[name][budget] = summarize(estimates, errors, exact)
    return results


def diag_sweep(
    G: cola.ops.LinearOperator, exact: torch.Tensor, seeds: int
) -> dict[str, dict[int, dict[str, float]]]:
    """Return, per diagonal method and budget, the median relative 2-norm error.

    The bias check is the largest entry-wise ``|z|`` of the mean estimate over seeds.
    """
    results: dict[str, dict[int, dict[str, float]]] = {}
    norm = float(torch.linalg.norm(exact))
    for name, method in DIAG_METHODS.items():
        results[name] = {}
        for budget in BUDGETS:
            estimates = torch.stack(
                [
                    cola.linalg.diag(G, alg=method(num_matvecs=budget, seed=seed))
                    for seed in range(seeds)
                ]
            )
            errors = (torch.linalg.norm(estimates - exact, dim=1) / norm).tolist()
            standard_error = estimates.std(dim=0) / seeds**0.5
            z = (estimates.mean(dim=0) - exact) / standard_error.clamp_min(1e-300)
            z = torch.where(standard_error > 1e-12 * exact.abs().max(), z, torch.zeros_like(z))
            results[name][budget] = {
                "median_rel_error": statistics.median(errors),
                "max_abs_bias_z": float(z.abs().max()),
            }
    return results


def slq_sweep(
    G: cola.ops.LinearOperator, dense: torch.Tensor, seeds: int
) -> dict[str, dict[str, object]]:
    """Return, per damping ``λ``, the exact ``slogdet(G + λI)`` and SLQ's errors on the grid."""
    results: dict[str, dict[str, object]] = {}
    identity = torch.eye(dense.shape[0], dtype=DTYPE)
    for lam in DAMPINGS:
        sign, exact = (float(v) for v in torch.linalg.slogdet(dense + lam * identity))
        A = G + lam * cola.ops.I_like(G)
        grid = []
        for probes in SLQ_PROBES:
            for steps in SLQ_STEPS:
                estimates = [
                    float(
                        cola.linalg.logdet(A, cc.SLQ(num_probes=probes, num_steps=steps, seed=seed))
                    )
                    for seed in range(seeds)
                ]
                errors = [abs(e - exact) / abs(exact) for e in estimates]
                summary = summarize(estimates, errors, exact)
                summary["median_abs_error"] = statistics.median(abs(e - exact) for e in estimates)
                grid.append(
                    {"probes": probes, "steps": steps, "products": probes * steps, **summary}
                )
        results[str(lam)] = {"exact_sign": sign, "exact_logabsdet": exact, "grid": grid}
    return results


def markdown(results: dict[str, dict[str, object]]) -> str:
    """Return the Markdown tables (median relative errors) for all problems."""
    header = "| problem | method | " + " | ".join(f"m={b}" for b in BUDGETS) + " |"
    rule = "| --- | --- | " + " | ".join("---" for _ in BUDGETS) + " |"
    lines = ["**Trace**, median relative error over seeds", "", header, rule]
    for problem, res in results.items():
        for name, row in res["trace"].items():
            cells = " | ".join(f"{row[b]['median_rel_error']:.1e}" for b in BUDGETS)
            lines.append(f"| {problem} | {name} | {cells} |")
    lines += ["", "**Diagonal**, median of ‖est − exact‖₂ / ‖exact‖₂", "", header, rule]
    for problem, res in results.items():
        for name, row in res["diag"].items():
            cells = " | ".join(f"{row[b]['median_rel_error']:.1e}" for b in BUDGETS)
            lines.append(f"| {problem} | {name} | {cells} |")
    lines += [
        "",
        "**SLQ log-determinant of GGN + λI**, median relative error (products = probes × steps)",
        "",
        "| problem | λ | exact logdet | steps | " + " | ".join(f"p={p}" for p in SLQ_PROBES) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in SLQ_PROBES) + " |",
    ]
    for problem, res in results.items():
        for lam, entry in res["slq"].items():
            exact = entry["exact_sign"] * entry["exact_logabsdet"]
            for steps in SLQ_STEPS:
                cells = " | ".join(
                    f"{g['median_rel_error']:.1e}" for g in entry["grid"] if g["steps"] == steps
                )
                lines.append(f"| {problem} | {lam} | {exact:.2f} | {steps} | {cells} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, object]], path: Path) -> None:
    """Save the three log-log panels (trace, diagonal, SLQ logdet) of error vs products.

    Colour: method (trace, diagonal) or Lanczos steps (SLQ); line style: problem; errors
    below ``1e-6`` (exact up to rounding) are drawn at ``1e-6``.
    """
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = dict(zip(results, ["-", "--"], strict=False))
    floor = 1e-6
    palette = {"Hutchinson": "tab:blue", "Hutch++": "tab:orange", "XTrace": "tab:green"}
    palette["XDiag"] = "tab:green"
    for kind, ax in zip(["trace", "diag"], axes[:2], strict=True):
        for problem, res in results.items():
            for name, row in res[kind].items():
                errors = [max(row[b]["median_rel_error"], floor) for b in BUDGETS]
                ax.loglog(
                    BUDGETS,
                    errors,
                    styles[problem],
                    color=palette[name],
                    marker="o",
                    label=f"{name}, {problem}",
                )
        ax.set_title(f"{kind}: median relative error (floor 1e-6 = exact)")
        ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
    ax = axes[2]
    colors = dict(zip(SLQ_STEPS, ["tab:blue", "tab:orange", "tab:green"], strict=True))
    markers = dict(zip(DAMPINGS, ["o", "s"], strict=True))
    for problem, res in results.items():
        for lam, entry in res["slq"].items():
            for steps in SLQ_STEPS:
                points = [g for g in entry["grid"] if g["steps"] == steps]
                ax.loglog(
                    [g["products"] for g in points],
                    [max(g["median_rel_error"], floor) for g in points],
                    styles[problem],
                    color=colors[steps],
                    marker=markers[float(lam)],
                    label=f"{problem}, λ={lam}, {steps} steps",
                )
    ax.set_title("SLQ logdet(GGN + λI): median rel. error (○ λ=0.01, □ λ=1)")
    for ax in axes:
        ax.set_xlabel("matrix-vector products")
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run all sweeps, write the JSON and the plot, and print the Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=20, help="seeds per trace/diagonal configuration"
    )
    parser.add_argument(
        "--slq-seeds", type=int, default=8, help="seeds per SLQ configuration (the costly part)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results"), help="output folder"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: dict[str, dict[str, object]] = {}
    timings: dict[str, float] = {}
    for problem, num_examples in PROBLEMS.items():
        tic = time.perf_counter()
        G, dense = build_problem(num_examples)
        timings[f"{problem} dense"] = time.perf_counter() - tic
        exact_trace = float(torch.trace(dense))
        res: dict[str, object] = {
            "num_examples": num_examples,
            "D": G.shape[0],
            "rank": int(torch.linalg.matrix_rank(dense)),
            "exact_trace": exact_trace,
        }
        for kind, sweep in [
            ("trace", lambda G=G, t=exact_trace: trace_sweep(G, t, args.seeds)),
            ("diag", lambda G=G, d=dense: diag_sweep(G, torch.diagonal(d), args.seeds)),
            ("slq", lambda G=G, d=dense: slq_sweep(G, d, args.slq_seeds)),
        ]:
            tic = time.perf_counter()
            res[kind] = sweep()
            timings[f"{problem} {kind}"] = time.perf_counter() - tic
        results[problem] = res
        print(f"{problem}: D={res['D']}, rank={res['rank']}, timings so far {timings}", flush=True)
    table = markdown(results)
    print(table)
    flags = [
        f"{problem} trace {name} m={b}: z={v['bias_z']:.1f}"
        for problem, res in results.items()
        for name, row in res["trace"].items()
        for b, v in row.items()
        if abs(v["bias_z"]) > 4
    ] + [
        f"{problem} SLQ λ={lam} p={g['probes']} s={g['steps']}: z={g['bias_z']:.1f}"
        for problem, res in results.items()
        for lam, entry in res["slq"].items()
        for g in entry["grid"]
        if abs(g["bias_z"]) > 4
    ]
    print("bias flags (|z| > 4, scalar estimates):", flags or "none")
    total = time.perf_counter() - start
    payload = {
        "command": "benchmarks/estimators.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seeds": args.seeds,
        "slq_seeds": args.slq_seeds,
        "slq_probes": SLQ_PROBES,
        "slq_steps": SLQ_STEPS,
        "dampings": DAMPINGS,
        "budgets": BUDGETS,
        "timings_s": {**timings, "total": total},
        "results": results,
    }
    (args.out / "estimators.json").write_text(json.dumps(payload, indent=1))
    plot(results, args.out / "estimators.png")
    print(f"total {total:.1f} s; wrote {args.out / 'estimators.json'} and estimators.png")


if __name__ == "__main__":
    main()
