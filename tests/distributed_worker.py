"""One rank of the 2-process gloo run that ``tests/test_distributed.py`` launches.

Usage: ``python tests/distributed_worker.py RANK WORLD_SIZE INIT_FILE OUT_FILE``. Every rank
builds the same problem, keeps its (uneven) shard of the batches, and saves the results
of the distributed operators and of the error scenarios to ``OUT_FILE``.
"""

import sys
from pathlib import Path

import cola
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cola_curvature as cc  # noqa: E402
from tests.test_distributed import DAMPING, SHARDS, build_problem, probe  # noqa: E402


def results(model, loss_func, params, shard):
    """The quantities compared with one process on the whole data."""
    ggn = cc.GGN(model, loss_func, params, shard, distributed=True)
    hessian = cc.Hessian(model, loss_func, params, shard, distributed=True)
    kfac = cc.KFAC(model, loss_func, params, shard, distributed=True)
    damped = ggn + DAMPING * cola.ops.I_like(ggn)
    v = probe(ggn.shape[0])
    laplace = cc.Laplace(
        model, cc.losses.CrossEntropy("sum"), params, shard, curvature="kfac", distributed=True
    )
    return {
        "ggn": ggn.to_dense(),
        "hvp": hessian @ v,
        "kfac": kfac.to_dense(),
        "kfac_logdet": cola.linalg.logdet(kfac + DAMPING * cola.ops.I_like(kfac)),
        "cg": cola.linalg.inv(damped) @ v,
        "slq": cola.linalg.logdet(damped, cc.SLQ(num_probes=4, num_steps=10)),
        "evidence": laplace.log_marginal_likelihood(),
    }


def error_message(build):
    """Return the message of the error ``build()`` raises (``None`` if it does not)."""
    try:
        build()
    except (ValueError, RuntimeError) as error:
        return str(error)
    return None


def main(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    torch.set_num_threads(1)
    model, loss_func, params, data = build_problem()
    shard = [data[i] for i in SHARDS[rank]]
    output = results(model, loss_func, params, shard)
    empty = [] if rank == 1 else shard
    output["empty_error"] = error_message(
        lambda: cc.GGN(model, loss_func, params, empty, distributed=True)
    )
    if rank == 1:
        with torch.no_grad():
            params[0][0, 0] += 1.0
    output["mismatch_error"] = error_message(
        lambda: cc.GGN(model, loss_func, params, shard, distributed=True)
    )
    torch.save(output, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
