"""Data-parallel scaling of curvature products: 2 gloo processes against 1, on this machine.

The MLP 784-256-256-10 (tanh, mean cross-entropy) of ``benchmarks/workloads.py`` on a fixed
data set of 1024 examples in batches of 128; one process holds all of it, or each of two
processes holds half (``distributed=True``, one ``all_reduce`` per product). Each process
uses one torch thread, so two processes use the machine's two cores. Reports the median
wall time of a GGN product with 8 columns and of a KFAC build, and the parallel efficiency
``t₁ / (2 t₂)``.

Run: ``.venv-ci/bin/python benchmarks/distributed.py [--repeats 5]`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import cola_curvature as cc

NUM_EXAMPLES, BATCH, COLUMNS = 1024, 128, 8


def build(rank: int, world_size: int) -> tuple[nn.Module, list[torch.Tensor], list]:
    """Return the model, its parameters and this rank's batches (fixed seeds)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    X = torch.randn(NUM_EXAMPLES, 784, generator=generator)
    y = torch.randint(0, 10, (NUM_EXAMPLES,), generator=generator)
    batches = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, NUM_EXAMPLES, BATCH)]
    return model, list(model.parameters()), batches[rank::world_size]


def measure(rank: int, world_size: int, repeats: int) -> dict[str, float]:
    """Return the median seconds of one GGN product and one KFAC build on this rank."""
    model, params, shard = build(rank, world_size)
    distributed = world_size > 1
    options = {"check_deterministic": False, "distributed": distributed}
    ggn = cc.GGN(model, nn.CrossEntropyLoss(), params, shard, **options)
    V = torch.randn(ggn.shape[0], COLUMNS, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {"ggn_product": [], "kfac_build": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name, run in [
            ("ggn_product", lambda: ggn @ V),
            ("kfac_build", lambda: cc.KFAC(model, nn.CrossEntropyLoss(), params, shard, **options)),
        ]:
            if distributed:
                dist.barrier()
            start = time.perf_counter()
            run()
            if distributed:
                dist.barrier()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def rank_main(rank: int, world_size: int, init_file: str, out_file: str, repeats: int) -> None:
    """One rank: join the group, measure, and write the result (rank 0)."""
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
    result = measure(rank, world_size, repeats)
    if rank == 0:
        Path(out_file).write_text(json.dumps(result))
    if world_size > 1:
        dist.destroy_process_group()


def launch(world_size: int, repeats: int, folder: Path) -> dict[str, float]:
    """Run ``world_size`` processes of this script and return rank 0's medians."""
    init_file, out_file = folder / f"init-{world_size}", folder / f"out-{world_size}.json"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank",
                str(rank),
                "--world-size",
                str(world_size),
                "--init-file",
                str(init_file),
                "--out-file",
                str(out_file),
                "--repeats",
                str(repeats),
            ]
        )
        for rank in range(world_size)
    ]
    for process in processes:
        if process.wait() != 0:
            raise RuntimeError(f"a rank of the {world_size}-process run failed")
    return json.loads(out_file.read_text())


def main() -> None:
    """Measure 1 and 2 processes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--init-file")
    parser.add_argument("--out-file")
    parser.add_argument("--out", default="benchmarks/results/distributed.json")
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.world_size, args.init_file, args.out_file, args.repeats)
        return
    with tempfile.TemporaryDirectory() as folder:
        one = launch(1, args.repeats, Path(folder))
        two = launch(2, args.repeats, Path(folder))
    rows = {
        name: {
            "one_process_s": one[name],
            "two_processes_s": two[name],
            "efficiency": one[name] / (2 * two[name]),
        }
        for name in one
    }
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("| measurement | 1 process (s) | 2 processes (s) | efficiency t₁/(2t₂) |")
    print("| --- | --- | --- | --- |")
    for name, row in rows.items():
        print(
            f"| {name} | {row['one_process_s']:.3f} | {row['two_processes_s']:.3f} | "
            f"{row['efficiency']:.2f} |"
        )


if __name__ == "__main__":
    main()
