"""A new algorithm is one class: subclassing a ``cc.matfree`` base serves the existing rules.

Each toy algorithm below answers its question from ``A.to_dense()``; the rules in
``dispatch_rules`` were not edited for them. They are checked against dense float64
references built independently (``tests/reference.py``, ``torch.func`` only).
"""

from dataclasses import dataclass

import cola
import numpy as np
import pytest
import torch
from torch import nn

from cola_curvature import GGN
from cola_curvature.matfree import DiagonalEstimator, EigenSolver, LinearSolver, TraceEstimator
from cola_curvature.matfree._random import seeded_random_source
from tests import reference

F64 = torch.float64
RTOL = 1e-10
DAMPING = 0.3


@dataclass(frozen=True)
class ExactTrace(TraceEstimator):
    def trace(self, A):
        return A.to_dense().trace()


@dataclass(frozen=True)
class ExactDiagonal(DiagonalEstimator):
    def diagonal(self, A):
        return A.to_dense().diagonal()


@dataclass(frozen=True)
class DenseSolve(LinearSolver):
    def solve(self, A, B):
        return torch.linalg.solve(A.to_dense(), B), {}


@dataclass(frozen=True)
class DenseEigs(EigenSolver):
    def eigs(self, A, k, which):
        values, vectors = torch.linalg.eigh(A.to_dense())
        assert which == "LA"
        return values[-k:].flip(0), vectors[:, -k:].flip(1)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    X, y = torch.randn(12, 3, dtype=F64), torch.randn(12, 2, dtype=F64)
    return (
        model,
        nn.MSELoss(reduction="sum"),
        list(model.parameters()),
        [(X[:7], y[:7]), (X[7:], y[7:])],
    )


@pytest.fixture(scope="module")
def ggn(problem):
    return GGN(*problem), reference.dense_ggn(*problem).detach()


def damped(G):
    return G + DAMPING * cola.ops.I_like(G)


def close(actual, expected):
    return torch.allclose(
        torch.as_tensor(actual), expected, rtol=RTOL, atol=RTOL * expected.abs().max()
    )


def test_a_new_trace_estimator_serves_the_trace_rules(ggn):
    G, dense = ggn
    assert close(cola.linalg.trace(G, ExactTrace()), dense.trace())
    damped_trace = dense.trace() + DAMPING * dense.shape[0]
    assert close(cola.linalg.trace(damped(G), ExactTrace()), damped_trace)


def test_a_new_diagonal_estimator_serves_the_diag_rules(ggn):
    G, dense = ggn
    assert close(cola.linalg.diag(G, 0, ExactDiagonal()), dense.diagonal())
    assert close(cola.linalg.diag(damped(G), 0, ExactDiagonal()), dense.diagonal() + DAMPING)


def test_a_new_linear_solver_serves_the_inverse_rules(ggn):
    G, dense = ggn
    b = torch.linspace(-1, 1, dense.shape[0], dtype=F64)
    expected = torch.linalg.solve(dense + DAMPING * torch.eye(dense.shape[0], dtype=F64), b)
    assert close(cola.linalg.inv(damped(G), DenseSolve()) @ b, expected)


def test_a_new_eigensolver_serves_the_eig_rules(ggn):
    G, dense = ggn
    values, vectors = cola.linalg.eig(G, 3, "LA", DenseEigs())
    assert close(values, torch.linalg.eigvalsh(dense)[-3:].flip(0))
    residual = dense @ vectors.to_dense() - vectors.to_dense() * values
    assert residual.norm() <= RTOL * dense.norm()


def test_an_array_type_without_a_backend_has_no_random_source():
    with pytest.raises(TypeError, match="ndarray"):
        seeded_random_source(np.zeros(1), 0)
