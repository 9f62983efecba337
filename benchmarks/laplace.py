"""Time the Laplace posterior against laplace-torch: the fit and the evidence optimisation.

Problem of ``examples/demo.py``: 150 points ``x ~ U[0, 8]``, ``y = sin(x) + ε``,
``ε ~ N(0, 0.3²)``, an MLP 1-50-1 (tanh, D = 151) trained with full-batch Adam (2000
steps, lr 1e-2), float64, data in batches of 64. Measured for curvature ``"full"`` and
``"kfac"`` (laplace-torch: ``"full"`` and ``"kron"``, default Curvlinops backend), and
for our matrix-free ``"ggn"`` (SLQ logdet; no peer):

* fit: ours ``cc.Laplace(model, nn.MSELoss(), params, data, curvature=c)``; theirs
  ``laplace.Laplace(model, "regression", hessian_structure=c).fit(loader)``;
* marglik: 1000 Adam steps (lr 0.1) on ``log δ`` and ``log σ`` from ``δ = σ = 1`` on the
  posterior just fitted; ours ``la.optimize_prior_precision(steps=1000, lr=0.1)``, theirs
  the loop of laplace-torch's README over ``la.log_marginal_likelihood(δ, σ)`` (its
  ``optimize_prior_precision(method="marglik")`` tunes ``δ`` only). For ``"ggn"`` the
  one-off SLQ of the GGN falls in this step.

Every round runs all measurements once, in turn (``--repeats`` rounds after one warm-up
round with 10 marglik steps); the table gives medians and ours/theirs. Writes
``benchmarks/results/laplace.json``.
Run from the repository root::

    .venv-ci/bin/python benchmarks/laplace.py --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cola_curvature as cc

# This script is benchmarks/laplace.py: with its folder first on sys.path, ``import laplace``
# would find the script itself instead of laplace-torch.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
from laplace import Laplace as PeerLaplace  # noqa: E402

F64 = torch.float64
STEPS = 1000
WARMUP_STEPS = 10
LR = 0.1
BATCH = 64
PEER_STRUCTURE = {"full": "full", "kfac": "kron"}


def build_problem(train_steps: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Return the trained MLP 1-50-1 and the 150 points of ``examples/demo.py``."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = 8 * torch.rand(150, 1, generator=generator, dtype=F64)
    y = torch.sin(x) + 0.3 * torch.randn(150, 1, generator=generator, dtype=F64)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1)).to(F64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, x, y


def ours_fit(model: nn.Module, data: list, curvature: str) -> cc.Laplace:
    """Build our posterior (the curvature and, for ``"full"``/``"kfac"``, nothing else)."""
    return cc.Laplace(model, nn.MSELoss(), list(model.parameters()), data, curvature=curvature)


def ours_marglik(la: cc.Laplace, steps: int = STEPS) -> tuple[float, float]:
    """Run ``steps`` Adam steps on the evidence from ``δ = σ = 1``; return ``(δ, σ)``."""
    la.prior_precision = torch.tensor(1.0, dtype=F64)
    la.sigma_noise = torch.tensor(1.0, dtype=F64)
    la.optimize_prior_precision(steps=steps, lr=LR, progressbar=False)
    return la.prior_precision.item(), la.sigma_noise.item()


def theirs_fit(model: nn.Module, loader: DataLoader, structure: str) -> PeerLaplace:
    """Build laplace-torch's posterior over all weights and fit it."""
    la = PeerLaplace(model, "regression", subset_of_weights="all", hessian_structure=structure)
    la.fit(loader)
    return la


def theirs_marglik(la: PeerLaplace, steps: int = STEPS) -> tuple[float, float]:
    """Run the README loop over ``log δ`` and ``log σ`` from 1; return ``(δ, σ)``."""
    log_prior = torch.zeros(1, dtype=F64, requires_grad=True)
    log_sigma = torch.zeros(1, dtype=F64, requires_grad=True)
    optimizer = torch.optim.Adam([log_prior, log_sigma], lr=LR)
    for _ in range(steps):
        optimizer.zero_grad()
        neg_marglik = -la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())
        neg_marglik.backward()
        optimizer.step()
    return log_prior.exp().item(), log_sigma.exp().item()


def rounds(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int
) -> tuple[dict[str, list[float]], dict[str, tuple[float, float, float]]]:
    """Time every (side, curvature, stage) once per round, interleaved.

    Returns the times per key ``"<side> <curvature> <stage>"`` and, per side and
    curvature, the optimum ``(δ, σ)`` and the evidence there from the last round.
    """
    data = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, x.shape[0], BATCH)]
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    sides: list[tuple[str, str, Callable[[], object], Callable[[object], tuple]]] = []
    for curvature in ("full", "kfac", "ggn"):
        sides.append(
            ("ours", curvature, lambda c=curvature: ours_fit(model, data, c), ours_marglik)
        )
        if curvature in PEER_STRUCTURE:
            structure = PEER_STRUCTURE[curvature]
            sides.append(
                (
                    "laplace-torch",
                    curvature,
                    lambda s=structure: theirs_fit(model, loader, s),
                    theirs_marglik,
                )
            )
    times: dict[str, list[float]] = {}
    optima: dict[str, tuple[float, float, float]] = {}
    for round_index in range(repeats + 1):  # round 0 is a warm-up of WARMUP_STEPS steps
        steps = STEPS if round_index > 0 else WARMUP_STEPS
        for side, curvature, fit, marglik in sides:
            start = time.perf_counter()
            la = fit()
            middle = time.perf_counter()
            delta, sigma = marglik(la, steps)
            end = time.perf_counter()
            if round_index > 0:
                times.setdefault(f"{side} {curvature} fit", []).append(middle - start)
                times.setdefault(f"{side} {curvature} marglik", []).append(end - middle)
            evidence = la.log_marginal_likelihood(
                torch.tensor(delta, dtype=F64), torch.tensor(sigma, dtype=F64)
            )
            optima[f"{side} {curvature}"] = (delta, sigma, float(evidence))
    return times, optima


def table(medians: dict[str, float]) -> list[str]:
    """Return the Markdown rows: median seconds of both sides and the ratio ours/theirs."""
    rows = [
        "| curvature | stage | ours (s) | laplace-torch (s) | ours / theirs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for curvature in ("full", "kfac", "ggn"):
        for stage in ("fit", "marglik"):
            ours = medians[f"ours {curvature} {stage}"]
            key = f"laplace-torch {curvature} {stage}"
            if key in medians:
                theirs, ratio = f"{medians[key]:.3f}", f"{ours / medians[key]:.2f}"
            else:
                theirs, ratio = "—", "—"
            label = curvature + (f" / {PEER_STRUCTURE[curvature]}" if key in medians else "")
            rows.append(f"| {label} | {stage} | {ours:.3f} | {theirs} | {ratio} |")
    return rows


def main() -> None:
    """Run the rounds, print the table and write ``benchmarks/results/laplace.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up")
    parser.add_argument("--train-steps", type=int, default=2000, help="Adam steps on the MLP")
    args = parser.parse_args()
    model, x, y = build_problem(args.train_steps)
    times, optima = rounds(model, x, y, args.repeats)
    medians = {key: statistics.median(values) for key, values in times.items()}
    versions = {
        name: importlib.metadata.version(name)
        for name in ("torch", "laplace-torch", "curvlinops-for-pytorch", "cola-ml")
    }
    header = (
        f"torch {versions['torch']}, laplace-torch {versions['laplace-torch']}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(header + "\n")
    print("\n".join(table(medians)))
    print("\noptimum (δ, σ, log evidence) after the marglik steps:")
    for key, (delta, sigma, evidence) in optima.items():
        print(f"  {key}: δ = {delta:.4f}, σ = {sigma:.4f}, log evidence = {evidence:.4f}")
    out = Path(__file__).parent / "results" / "laplace.json"
    out.parent.mkdir(exist_ok=True)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "medians_s": medians,
        "times_s": times,
        "optima": {
            key: {"prior_precision": d, "sigma_noise": s, "log_evidence": e}
            for key, (d, s, e) in optima.items()
        },
    }
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
