"""Data-parallel operators on 2 gloo ranks give what one process gives on the whole data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cola
import pytest
import torch
from torch import nn

import cola_curvature as cc

F64 = torch.float64
DAMPING = 0.1
#: Batch indices per rank: uneven shards (two batches of 5 and 3 examples, and one of 4).
SHARDS = {0: [0, 2], 1: [1]}
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def build_problem():
    """A tanh MLP with mean cross-entropy and three uneven batches, from fixed seeds."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=F64))
    X = torch.randn(12, 3, generator=generator, dtype=F64)
    y = torch.randint(0, 3, (12,), generator=generator)
    data = [(X[:5], y[:5]), (X[5:9], y[5:9]), (X[9:], y[9:])]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


def probe(dimension):
    return torch.randn(dimension, generator=torch.Generator().manual_seed(1), dtype=F64)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the two ranks (as ``torchrun`` would: one process each) and load their results."""
    folder = tmp_path_factory.mktemp("gloo")
    init_file = folder / "init"
    outputs = [folder / f"rank{rank}.pt" for rank in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(init_file), str(outputs[rank])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [process.communicate(timeout=300)[0] for process in processes]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log
    return [torch.load(path) for path in outputs]


def test_two_ranks_equal_one_process(ranks):
    model, loss_func, params, data = build_problem()
    ggn = cc.GGN(model, loss_func, params, data)
    kfac = cc.KFAC(model, loss_func, params, data)
    damped = ggn + DAMPING * cola.ops.I_like(ggn)
    v = probe(ggn.shape[0])
    laplace = cc.Laplace(model, cc.losses.CrossEntropy("sum"), params, data, curvature="kfac")
    expected = {
        "ggn": ggn.to_dense(),
        "hvp": cc.Hessian(model, loss_func, params, data) @ v,
        "kfac": kfac.to_dense(),
        "kfac_logdet": cola.linalg.logdet(kfac + DAMPING * cola.ops.I_like(kfac)),
        "cg": cola.linalg.inv(damped) @ v,
        "slq": cola.linalg.logdet(damped, cc.SLQ(num_probes=4, num_steps=10)),
        "evidence": laplace.log_marginal_likelihood(),
    }
    for result in ranks:
        for name, value in expected.items():
            error = (result[name] - value).abs().max() / value.abs().max()
            assert error < 1e-10, (name, error)
    assert torch.equal(ranks[0]["cg"], ranks[1]["cg"])  # every rank holds the same vector


def test_an_empty_shard_or_differing_parameters_are_refused_on_every_rank(ranks):
    for result in ranks:
        assert "ranks [1] hold no examples" in result["empty_error"]
        assert "parameter values differ across ranks" in result["mismatch_error"]


def test_distributed_without_a_process_group_says_how_to_start_one():
    model, loss_func, params, data = build_problem()
    with pytest.raises(RuntimeError, match="init_process_group"):
        cc.GGN(model, loss_func, params, data, distributed=True)


def test_jax_batches_sharded_over_four_host_devices_give_the_same_products():
    devices = "--xla_force_host_platform_device_count=4"
    environment = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {devices}"}
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parent / "jax_mesh_worker.py")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    for name, error in report["errors"].items():
        assert error < 1e-12, (name, error)
