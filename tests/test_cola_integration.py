"""The operators inside CoLA's algorithms: solves and products in no-grad contexts."""

import cola
import pytest
import torch
from torch import nn

import cola_curvature as cc

RTOL = 1e-10


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X = torch.randn(9, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (9,))
    return model, nn.CrossEntropyLoss(), list(model.parameters()), [(X[:4], y[:4]), (X[4:], y[4:])]


@pytest.mark.parametrize("operator", [cc.GGN, cc.Hessian, cc.EmpiricalFisher])
def test_product_inside_autograd_function_and_no_grad(operator):
    """Forward mode is off inside autograd.Function.forward; products must not notice."""
    A = operator(*_problem())
    V = torch.randn(A.shape[0], 2, dtype=torch.float64)
    expected = A @ V

    class Wrapped(torch.autograd.Function):
        @staticmethod
        def forward(ctx, X):
            return A @ X

        @staticmethod
        def backward(ctx, grad):
            return grad

    with torch.no_grad():
        inside_no_grad = A @ V
    inside_function = Wrapped.apply(V.clone().requires_grad_(True))
    assert torch.allclose(inside_no_grad, expected, rtol=RTOL, atol=0)
    assert torch.allclose(inside_function, expected, rtol=RTOL, atol=0)


def test_cg_solve_of_damped_ggn_matches_dense_solve():
    """cola.linalg.inv(GGN + λI, alg=CG) @ b equals the dense solve."""
    G = cc.GGN(*_problem())
    damping = 0.1
    b = torch.randn(G.shape[0], dtype=torch.float64)
    damped = G + damping * cola.ops.I_like(G)
    x = cola.linalg.inv(damped, alg=cola.linalg.CG(tol=1e-12, max_iters=200)) @ b
    dense = G.to_dense() + damping * torch.eye(G.shape[0], dtype=torch.float64)
    expected = torch.linalg.solve(dense, b)
    assert torch.allclose(x, expected, rtol=1e-8, atol=1e-10)
