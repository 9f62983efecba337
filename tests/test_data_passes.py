"""Each batch is validated once per operator, however many operators a build makes inside.

``TorchBackend.check_batch`` runs on every batch while ``CurvatureData`` counts the data; an
operator that builds others on the same data (KFAC's block for uncovered parameters, a
Laplace posterior's curvature, a Laplace subset) reuses the counted data instead of
reading and checking it again.
"""

import pytest
import torch
from torch import nn

import cola_curvature as cc
from cola_curvature.backends.torch.backend import TorchBackend

F64 = torch.float64


@pytest.fixture
def checked_batches(monkeypatch):
    """Count the calls of the torch backend's batch validation."""
    calls = []
    original = TorchBackend.check_batch

    def counting(self, batch):
        calls.append(batch)
        return original(self, batch)

    monkeypatch.setattr(TorchBackend, "check_batch", counting)
    return calls


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    X, y = torch.randn(9, 3, dtype=F64), torch.randint(0, 2, (9,))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    return model, nn.CrossEntropyLoss(), list(model.parameters()), data


@pytest.mark.parametrize("operator", ["GGN", "DiagonalCurvature", "SymmetryCurvature"])
def test_an_operator_checks_each_batch_once(checked_batches, operator):
    model, loss, params, data = problem()
    getattr(cc, operator)(model, loss, params, data)
    assert len(checked_batches) == len(data)


@pytest.mark.parametrize("uncovered", ["diagonal", "dense"])
def test_kfac_builds_its_uncovered_block_on_the_checked_data(checked_batches, uncovered):
    model, loss, params, data = problem()
    kfac = cc.KFAC(model, loss, params, data, uncovered=uncovered)
    assert len(checked_batches) == len(data)
    assert len(kfac.blocks) == 3  # two linear layers and the LayerNorm's parameters


@pytest.mark.parametrize("curvature", ["lowrank", "kfac", "full"])
def test_laplace_checks_each_batch_once(checked_batches, curvature):
    model, loss, params, data = problem()
    options = {"rank": 3} if curvature == "lowrank" else {"uncovered": "diagonal"}
    cc.Laplace(model, loss, params, data, curvature=curvature, **options)
    assert len(checked_batches) == len(data)


def test_last_layer_laplace_checks_each_batch_once(checked_batches):
    model, loss, params, data = problem()
    laplace = cc.Laplace(
        model, loss, params, data, curvature="full", subset_of_weights="last_layer"
    )
    assert len(checked_batches) == len(data)
    assert laplace.curvature.shape == (10, 10)
