"""The accuracy metrics of benchmarks/symmetry_metrics.py, and a --quick run of the benchmark."""

import math

import pytest
import torch

from benchmarks import symmetry_accuracy
from benchmarks.symmetry_metrics import (
    optimal_scale,
    relative_frobenius_error,
    scale_optimal_error,
    subspace_overlap,
    top_k_projector,
)

F64 = torch.float64


def random_symmetric(size, seed):
    A = torch.randn(size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return A + A.T


def random_orthogonal(size, seed):
    Q, _ = torch.linalg.qr(
        torch.randn(size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))
    )
    return Q


def test_relative_frobenius_error_is_the_entrywise_formula():
    B, C = random_symmetric(4, 0), random_symmetric(4, 1)
    expected = math.sqrt(
        sum(float(b - c) ** 2 for b, c in zip(B.flatten(), C.flatten(), strict=True))
    )
    expected /= math.sqrt(sum(float(c) ** 2 for c in C.flatten()))
    assert abs(relative_frobenius_error(B, C) - expected) < 1e-12 * expected


def test_scale_optimal_error_has_the_closed_form_and_minimises_over_scales():
    B, C = random_symmetric(4, 2), random_symmetric(4, 3)
    inner = float((B * C).sum())
    norm_B, norm_C = float(B.norm()), float(C.norm())
    assert abs(optimal_scale(B, C) - inner / norm_B**2) < 1e-12 * abs(inner) / norm_B**2
    closed = math.sqrt(1 - (inner / (norm_B * norm_C)) ** 2)
    assert abs(scale_optimal_error(B, C) - closed) < 1e-10
    scales = torch.linspace(-2, 2, 4001, dtype=F64) * abs(inner) / norm_B**2
    grid = min(float((c * B - C).norm()) / norm_C for c in scales)
    assert closed <= grid + 1e-12 and grid - closed < 1e-5


def test_scale_optimal_error_ignores_the_scale_and_the_raw_error_does_not():
    C = random_symmetric(5, 4)
    assert scale_optimal_error(7.5 * C, C) < 1e-12
    assert abs(relative_frobenius_error(7.5 * C, C) - 6.5) < 1e-12
    assert scale_optimal_error(torch.zeros_like(C), C) == 1.0


def test_subspace_overlap_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    Q = random_orthogonal(6, 5)
    top = torch.tensor([5.0, 4.0, 3.0, 0.3, 0.2, 0.1], dtype=F64)
    bottom = top.flip(0)
    C = (Q * top) @ Q.T
    same_space = (Q * torch.tensor([9.0, 1.0, 2.0, 0.0, -1.0, 0.5], dtype=F64)) @ Q.T
    assert abs(subspace_overlap(same_space, C, 3) - 1) < 1e-12
    assert subspace_overlap((Q * bottom) @ Q.T, C, 3) < 1e-12


def test_subspace_overlap_of_a_rotated_eigenvector_is_the_squared_cosine():
    Q = random_orthogonal(5, 6)
    angle = 0.7
    rotated = math.cos(angle) * Q[:, 0] + math.sin(angle) * Q[:, 1]
    values = torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1], dtype=F64)
    C = (Q * values) @ Q.T
    B = 3.0 * torch.outer(rotated, rotated) + 0.1 * torch.eye(5, dtype=F64)
    assert abs(subspace_overlap(B, C, 1) - math.cos(angle) ** 2) < 1e-12
    # k = 2: B's top-2 projector is r rᵀ + (I − r rᵀ)/4 (its other 4 eigenvalues tie), and
    # r lies in C's top-2 space, so tr(P_B P_C) = 1 + (2 − 1)/4
    assert abs(subspace_overlap(B, C, 2) - (1 + 1 / 4) / 2) < 1e-12


def test_a_tied_edge_averages_its_eigenspace():
    identity = torch.eye(8, dtype=F64)
    C = random_symmetric(8, 7)
    assert torch.allclose(top_k_projector(identity, 3), 3 / 8 * identity, atol=1e-14)
    assert abs(subspace_overlap(identity, C, 3) - 3 / 8) < 1e-12
    # a Kronecker product with an identity factor: top-2 of a 3-fold top eigenvalue
    D = torch.kron(torch.diag(torch.tensor([2.0, 1.0], dtype=F64)), torch.eye(3, dtype=F64))
    expected = torch.diag(torch.tensor([2 / 3] * 3 + [0.0] * 3, dtype=F64))
    assert torch.allclose(top_k_projector(D, 2), expected, atol=1e-14)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.eye(3, dtype=F64), torch.eye(4, dtype=F64)), "B and C"),
        ((torch.ones(3, dtype=F64), torch.ones(3, dtype=F64)), "B and C"),
    ],
)
def test_metrics_refuse_mismatched_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        relative_frobenius_error(*args)


def test_top_k_projector_refuses_a_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        top_k_projector(torch.eye(3, dtype=F64), 4)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("symmetry")
    record = symmetry_accuracy.main(["--quick", "--output-dir", str(folder)])
    return record, folder


def test_quick_run_produces_finite_numbers_for_every_method_and_layer(quick_run):
    record, _ = quick_run
    (model,) = record["models"].values()
    (point,) = model["points"].values()
    assert set(point["layers"]) == set(model["layers"])
    for layer in point["layers"].values():
        assert set(layer) == set(symmetry_accuracy.METHODS)
        for entry in layer.values():
            for key, value in entry.items():
                assert value is None or math.isfinite(value), key
            assert 0 <= entry["ggn_overlap"] <= 1 + 1e-9
            assert 0 <= entry["ggn_scaled"] <= entry["ggn_raw"] + 1e-12
    reference = point["mean"][symmetry_accuracy.REFERENCE]
    assert reference["ggn_raw"] < 1e-12 and abs(reference["ggn_overlap"] - 1) < 1e-9


def test_quick_run_writes_the_json_chart_and_markdown_section(quick_run):
    _, folder = quick_run
    assert (folder / "symmetry_accuracy.json").stat().st_size > 0
    assert (folder / "symmetry_accuracy.png").stat().st_size > 0
    text = (folder / "RESULTS.md").read_text()
    assert symmetry_accuracy.BEGIN in text and symmetry_accuracy.END in text
    assert "Who wins" in text
