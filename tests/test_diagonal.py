"""The exact curvature diagonal against the dense references' diagonals, and its rules."""

import cola
import pytest
import torch

import cola_curvature as cc
from cola_curvature.kfac_statistics import chunking
from tests._tols import EXACT_RTOL
from tests.cases import Case
from tests.reference import dense_empirical_fisher, dense_ggn

F64 = torch.float64
CASES = [
    Case("mlp", "bce", "mean", "uneven"),
    Case("cnn", "ce", "sum", "uneven"),
    Case("sequence", "mse", "mean", "uneven"),
    Case("subset", "ce", "mean", "one"),
]


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
@pytest.mark.parametrize(
    ("fisher_type", "reference"), [("type-2", dense_ggn), ("empirical", dense_empirical_fisher)]
)
def test_diagonal_is_exact(case, fisher_type, reference):
    model, loss_func, params, data = case.build()
    diagonal = cc.DiagonalCurvature(model, loss_func, params, data, fisher_type=fisher_type)
    expected = torch.diag(reference(model, loss_func, params, data))
    assert relative_error(cola.linalg.diag(diagonal), expected) < EXACT_RTOL
    assert relative_error(diagonal.to_dense(), torch.diag(expected)) < EXACT_RTOL


def test_mc_diagonal_matches_the_mc_fisher_drawn_from_the_same_seed():
    model, loss_func, params, data = Case("mlp", "ce", "mean", "uneven").build()
    diagonal = cc.DiagonalCurvature(
        model, loss_func, params, data, fisher_type="mc", mc_samples=3, seed=4
    )
    fisher = cc.FisherMC(model, loss_func, params, data, mc_samples=3, seed=4)
    assert relative_error(cola.linalg.diag(diagonal), torch.diag(fisher.to_dense())) < EXACT_RTOL


def test_rules_on_the_damped_diagonal():
    model, loss_func, params, data = Case("mlp", "ce", "mean", "one").build()
    diagonal = cc.DiagonalCurvature(model, loss_func, params, data)
    damped = diagonal + 0.1 * cola.ops.I_like(diagonal)
    dense = diagonal.to_dense() + 0.1 * torch.eye(diagonal.shape[0], dtype=F64)
    v = torch.randn(diagonal.shape[0], dtype=F64)
    assert isinstance(damped, cc.KroneckerFactored)
    assert relative_error(cola.linalg.inv(damped) @ v, torch.linalg.solve(dense, v)) < EXACT_RTOL
    assert abs(cola.linalg.logdet(damped) - torch.logdet(dense)) < EXACT_RTOL * abs(
        torch.logdet(dense)
    )
    root = cola.linalg.sqrt(damped).to_dense()
    assert relative_error(root @ root, dense) < EXACT_RTOL
    values, vectors = cola.linalg.eig(damped, 3, which="LM")
    assert torch.allclose(values, torch.linalg.eigvalsh(dense)[-3:].flip(0), rtol=1e-12)
    assert torch.allclose(dense @ vectors.to_dense(), vectors.to_dense() * values, atol=1e-12)


def test_forward_only_is_rejected():
    model, loss_func, params, data = Case("mlp", "ce", "mean", "one").build()
    with pytest.raises(ValueError, match="output cotangents"):
        cc.DiagonalCurvature(model, loss_func, params, data, fisher_type="forward-only")


@pytest.mark.parametrize("split", ["columns", "examples"])
def test_diagonal_held_a_chunk_at_a_time_is_exact(split, monkeypatch):
    """Per-example gradients over the memory budget are summed in chunks, to the same diagonal."""
    model, loss_func, params, data = Case("sequence", "ce", "sum", "uneven").build()
    dimension = sum(p.numel() for p in params)
    num_examples = len(data[0][0])
    budget = 2 * num_examples * dimension * 8 if split == "columns" else 3 * dimension * 8
    monkeypatch.setattr(chunking, "PER_EXAMPLE_GRADIENT_BYTES", budget)
    num_columns = model(data[0][0]).shape[1:].numel()  # type-2 CE: C · T columns
    expected_chunks = (2, num_examples) if split == "columns" else (1, 3)
    assert chunking.gradient_chunks(num_columns, num_examples, dimension, 8) == expected_chunks
    diagonal = cc.DiagonalCurvature(model, loss_func, params, data)
    expected = torch.diag(dense_ggn(model, loss_func, params, data))
    assert relative_error(cola.linalg.diag(diagonal), expected) < EXACT_RTOL
