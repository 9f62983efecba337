"""Sums, multiples and block-diagonals of curvature operators stay matrix-free and keep the
parameter-space contract; every rule on them agrees with the dense matrix."""

import cola
import numpy as np
import pytest
import torch

import cola_curvature as cc
from cola_curvature.operators.shifted import CurvatureSum, ShiftedCurvature
from tests.cases import F64, Case

DAMPING = 0.5


@pytest.fixture(scope="module")
def problem():
    return Case("mlp", "ce", "sum", "one").build()


@pytest.fixture(scope="module")
def operators(problem):
    """GGN, KFAC, empirical-Fisher KFAC, and their dense matrices (the columns of ``@ I``)."""
    ggn = cc.GGN(*problem)
    kfac = cc.KFAC(*problem)
    empirical = cc.KFAC(*problem, fisher_type="empirical")
    identity = torch.eye(ggn.shape[0], dtype=F64)
    dense = {name: op @ identity for name, op in [("G", ggn), ("K", kfac), ("E", empirical)]}
    return {"G": ggn, "K": kfac, "E": empirical}, dense


def damped(A):
    return A + DAMPING * cola.ops.I_like(A)


COMPOSITIONS = {
    "K1+K2+λI": (lambda o: damped(o["K"] + o["E"]), lambda d, eye: d["K"] + d["E"] + DAMPING * eye),
    "2G+λI": (lambda o: damped(2.0 * o["G"]), lambda d, eye: 2 * d["G"] + DAMPING * eye),
    "G+K+λI": (lambda o: damped(o["G"] + o["K"]), lambda d, eye: d["G"] + d["K"] + DAMPING * eye),
    "λI+G-0.1K": (
        lambda o: DAMPING * cola.ops.I_like(o["G"]) + o["G"] - 0.1 * o["K"],
        lambda d, eye: d["G"] - 0.1 * d["K"] + DAMPING * eye,
    ),
}


@pytest.fixture
def product_widths(monkeypatch):
    """Record the columns of every GGN and KFAC product: a dense fallback needs ``D``."""
    widths = []
    for operator_type in (cc.GGN, cc.KroneckerFactored):
        original = operator_type._matmat

        def recording(self, X, original=original):
            widths.append(X.shape[1])
            return original(self, X)

        monkeypatch.setattr(operator_type, "_matmat", recording)
    return widths


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_rules_on_a_composition_are_matrix_free_and_right(operators, product_widths, name):
    ops, dense = operators
    build, build_dense = COMPOSITIONS[name]
    A = build(ops)
    D = A.shape[0]
    expected = build_dense(dense, torch.eye(D, dtype=F64))
    assert isinstance(A, (CurvatureSum, ShiftedCurvature))
    g = torch.linspace(-1.0, 1.0, D, dtype=F64)
    solve = cola.linalg.inv(A) @ g
    assert (solve - torch.linalg.solve(expected, g)).norm() < 1e-8 * solve.norm()
    values, vectors = cola.linalg.eig(A, 3, "LA")
    exact_values = torch.linalg.eigvalsh(expected).flip(0)[:3]
    assert (values - exact_values).abs().max() < 1e-8 * exact_values.abs().max()
    eigenvalues, U = torch.linalg.eigh(expected)
    root = (U * eigenvalues.sqrt()) @ U.T
    assert (cola.linalg.sqrt(A) @ g - root @ g).norm() < 1e-8 * (root @ g).norm()
    inverse_root = (U / eigenvalues.sqrt()) @ U.T
    assert (cola.linalg.isqrt(A) @ g - inverse_root @ g).norm() < 1e-8 * (inverse_root @ g).norm()
    assert torch.isfinite(cola.linalg.logdet(A))
    assert product_widths and max(product_widths) < D


def test_exact_parts_of_a_sum_stay_exact(operators):
    ops, dense = operators
    A = damped(ops["K"] + ops["E"])
    D = A.shape[0]
    expected = dense["K"] + dense["E"] + DAMPING * torch.eye(D, dtype=F64)
    assert abs(cola.linalg.trace(A) - expected.trace()) < 1e-12 * expected.trace()
    assert (cola.linalg.diag(A) - expected.diagonal()).abs().max() < 1e-12


def test_block_diagonal_of_curvatures_is_damped_block_by_block(operators, product_widths):
    ops, dense = operators
    B = cola.ops.BlockDiag(ops["K"], ops["G"])
    A = B + DAMPING * cola.ops.I_like(B)
    D = ops["G"].shape[0]
    g = torch.linspace(-1.0, 1.0, 2 * D, dtype=F64)
    expected = torch.block_diag(dense["K"], dense["G"]) + DAMPING * torch.eye(2 * D, dtype=F64)
    solve = cola.linalg.inv(A) @ g
    assert (solve - torch.linalg.solve(expected, g)).norm() < 1e-8 * solve.norm()
    assert max(product_widths) < D


def test_sqrt_of_a_diagonal_plus_low_rank_is_matrix_free():
    rng = np.random.default_rng(0)
    d = torch.as_tensor(rng.uniform(0.5, 2.0, 30))
    U = torch.as_tensor(rng.normal(size=(30, 3)))
    A = cc.DiagonalPlusLowRank(d, U, torch.eye(3, dtype=F64))
    dense = torch.diag(d) + U @ U.T
    eigenvalues, V = torch.linalg.eigh(dense)
    g = torch.linspace(-1.0, 1.0, 30, dtype=F64)
    root = cola.linalg.sqrt(A)
    assert not isinstance(root, cola.ops.Dense)
    expected = (V * eigenvalues.sqrt()) @ V.T @ g
    assert (root @ g - expected).norm() < 1e-8 * expected.norm()


DERIVED = {
    "K+λI": lambda o: damped(o["K"]),
    "2K": lambda o: 2.0 * o["K"],
    "inv(K+λI)": lambda o: cola.linalg.inv(damped(o["K"])),
    "sqrt(K+λI)": lambda o: cola.linalg.sqrt(damped(o["K"])),
    "G+λI": lambda o: damped(o["G"]),
    "2G": lambda o: 2.0 * o["G"],
    "inv(G+λI)": lambda o: cola.linalg.inv(damped(o["G"])),
    "sqrt(G+λI)": lambda o: cola.linalg.sqrt(damped(o["G"])),
    "G+K": lambda o: o["G"] + o["K"],
}


@pytest.mark.parametrize("name", list(DERIVED))
def test_derived_operators_keep_the_parameter_space_contract(operators, problem, name):
    A = DERIVED[name](operators[0])
    params = problem[2]
    D = A.shape[0]
    v = torch.linspace(-1.0, 1.0, D, dtype=F64)
    flat = A @ v
    chunks = v.split([p.numel() for p in params])
    shaped = A @ [c.reshape(p.shape) for c, p in zip(chunks, params, strict=True)]
    assert [s.shape for s in shaped] == [p.shape for p in params]
    assert (torch.cat([s.reshape(-1) for s in shaped]) - flat).norm() < 1e-10 * flat.norm()
    scipy_product = A.to_scipy() @ v.numpy()
    assert np.abs(scipy_product - flat.numpy()).max() < 1e-10 * flat.abs().max().item()
    with pytest.raises(ValueError, match=f"params have {D} entries"):
        A @ torch.ones(D + 1, dtype=F64)
    with pytest.raises(ValueError, match="NaN or infinite"):
        A @ torch.full((D,), float("nan"), dtype=F64)


def test_adding_operators_over_different_parameters_is_refused(operators):
    ggn = operators[0]["G"]
    model, loss, params, data = Case("cnn", "ce", "sum", "one").build()
    other = cc.GGN(model, loss, params, data)
    with pytest.raises(ValueError, match="same parameters"):
        ggn + other
