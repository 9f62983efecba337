"""Jacobian, JacobianTranspose, GradientMoments and Submatrix against dense float64 references.

References are built without ``cola_curvature``: the Jacobian one output entry at a time
by ``torch.autograd.grad`` (JAX: ``jax.jacrev``), per-example gradients by a Python loop
over the examples, each with the loss function applied to that example alone.
"""

import cola
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree
from torch import nn

import cola_curvature as cc
from tests._state import assert_unchanged, snapshot
from tests._tols import EXACT_ATOL, EXACT_RTOL, SCIPY_RTOL
from tests.cases import F64, Case
from tests.jax_cases import build_jax_problem
from tests.jax_reference import total_loss

JACOBIAN_CASES = [
    Case("mlp", "mse", "mean", "uneven"),
    Case("cnn", "ce", "mean", "uneven"),
    Case("sequence", "ce", "mean", "uneven"),  # outputs (N, 2, 3): C = 6 entries per example
]
MOMENT_CASES = [
    Case("mlp", "mse", "mean", "uneven"),
    Case("mlp", "mse", "sum", "uneven"),
    Case("cnn", "ce", "mean", "uneven"),
    Case("cnn", "ce", "sum", "uneven"),
    Case("sequence", "ce", "mean", "uneven"),  # T = 3 loss terms per example
]


def ids(cases):
    return [case.id for case in cases]


def assert_close(actual, expected, rtol=EXACT_RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert np.linalg.norm(actual - expected) <= rtol * np.linalg.norm(expected) + EXACT_ATOL


def random_matrix(rows, k, seed=0):
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def concatenated(data):
    return torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])


def dense_jacobian(model, params, data):
    """``(N · C, D)``: row ``n · C + c`` is the gradient of output entry ``c`` of example ``n``."""
    X, _ = concatenated(data)
    outputs = model(X).reshape(-1)
    rows = [
        flat(torch.autograd.grad(outputs[i], params, retain_graph=True))
        for i in range(outputs.numel())
    ]
    return torch.stack(rows).detach()


def per_example_gradients(model, loss_func, params, data):
    """``(N, D)``: gradient of ``loss_func`` on each example alone, in a Python loop."""
    X, Y = concatenated(data)
    return torch.stack(
        [
            flat(torch.autograd.grad(loss_func(model(X[n : n + 1]), Y[n : n + 1]), params))
            for n in range(X.shape[0])
        ]
    )


def sizes(params):
    return [p.numel() for p in params]


def dense_moments(gradients, centered):
    if centered:
        gradients = gradients - gradients.mean(0)
    return gradients.T @ gradients / gradients.shape[0]


@pytest.fixture(scope="module", params=JACOBIAN_CASES, ids=ids(JACOBIAN_CASES))
def jacobian_problem(request):
    """``(model, params, data, J, dense J)`` for one case."""
    model, _, params, data = request.param.build()
    return (
        model,
        params,
        data,
        cc.Jacobian(model, params, data),
        dense_jacobian(model, params, data),
    )


# ---------------------------------------------------------------------------------- torch


def test_jacobian_matches_the_dense_jacobian(jacobian_problem):
    _, params, _, J, expected = jacobian_problem
    V = random_matrix(J.shape[1], 3)
    U = random_matrix(J.shape[0], 2, seed=1)
    assert J.shape == expected.shape
    assert_close(J.to_dense(), expected)
    assert_close(J @ V, expected @ V)
    assert_close(J @ V[:, 0], expected @ V[:, 0])
    assert_close(U[:, 0] @ J, U[:, 0] @ expected)
    assert_close(U.T @ J, U.T @ expected)
    assert_close(J.T @ U, expected.T @ U)
    assert_close(J.T.to_dense(), expected.T)


def test_jacobian_transpose_matches_and_transposes_back(jacobian_problem):
    model, params, data, J, expected = jacobian_problem
    JT = cc.JacobianTranspose(model, params, data)
    U = random_matrix(JT.shape[1], 3)
    assert isinstance(J.T, cc.JacobianTranspose)
    assert isinstance(JT.T, cc.Jacobian)
    assert JT.shape == (expected.shape[1], expected.shape[0])
    assert_close(JT @ U, expected.T @ U)
    assert_close(JT @ U[:, 1], expected.T @ U[:, 1])
    V = random_matrix(JT.shape[0], 2, seed=1)
    assert_close(V.T @ JT, V.T @ expected.T)
    assert_close(JT.T @ V, expected @ V)


def test_jacobian_rows_follow_the_data_order_and_ignore_the_batching():
    case = Case("cnn", "ce", "mean", "uneven")
    model, _, params, data = case.build()
    _, _, _, one_batch = case.with_batching("one").build()
    before = snapshot(model)
    J, J_one = cc.Jacobian(model, params, data), cc.Jacobian(model, params, one_batch)
    V, U = random_matrix(J.shape[1], 2), random_matrix(J.shape[0], 2, seed=1)
    assert_close(J @ V, J_one @ V)
    assert_close(J.T @ U, J_one.T @ U)
    assert_unchanged(before, model)
    # example 0's rows are the Jacobian of its output entries, in C order
    first = [torch.autograd.grad(model(data[0][0][:1])[0, c], params) for c in range(3)]
    assert_close(J.to_dense()[:3], torch.stack([flat(g) for g in first]))


def test_jacobian_takes_parameter_shaped_input_and_a_parameter_subset():
    model, _, params, data = Case("subset", "mse", "mean", "uneven").build()
    J = cc.Jacobian(model, params, data)
    v = random_matrix(J.shape[1], 1)[:, 0]
    shaped = [v[:15].reshape(3, 5), v[15:]]
    assert J.shape == (45, 20)
    assert_close(J @ shaped, J @ v)
    assert_close(J @ v, dense_jacobian(model, params, data) @ v)


def test_jacobian_to_scipy_multiplies_both_ways(jacobian_problem):
    _, _, _, J, expected = jacobian_problem
    operator = J.to_scipy()
    V = random_matrix(J.shape[1], 2).numpy()
    U = random_matrix(J.shape[0], 2, seed=1).numpy()
    dense = expected.numpy()
    assert operator.shape == J.shape
    assert_close(operator.matvec(V[:, 0]), dense @ V[:, 0], SCIPY_RTOL)
    assert_close(operator.matmat(V), dense @ V, SCIPY_RTOL)
    assert_close(operator.rmatvec(U[:, 0]), dense.T @ U[:, 0], SCIPY_RTOL)
    assert_close(operator.rmatmat(U), dense.T @ U, SCIPY_RTOL)
    assert_close(J.T.to_scipy().matvec(U[:, 1]), dense.T @ U[:, 1], SCIPY_RTOL)


def test_empty_matrices_give_empty_products(jacobian_problem):
    _, _, _, J, _ = jacobian_problem
    assert (J @ torch.zeros(J.shape[1], 0, dtype=F64)).shape == (J.shape[0], 0)
    assert (J.T @ torch.zeros(J.shape[0], 0, dtype=F64)).shape == (J.shape[1], 0)


def test_jacobian_rejects_bad_input():
    model, loss_func, params, data = Case("mlp", "mse", "mean", "uneven").build()
    J = cc.Jacobian(model, params, data)
    D, rows = J.shape[1], J.shape[0]
    with pytest.raises(ValueError, match=r"needs v of shape \(43,\)"):
        J @ torch.zeros(D + 1, dtype=F64)
    with pytest.raises(ValueError, match=r"needs v of shape \(45,\)"):
        J.T @ torch.zeros(D, dtype=F64)
    with pytest.raises(ValueError, match="NaN or infinite"):
        J @ torch.full((D,), float("nan"), dtype=F64)
    with pytest.raises(ValueError, match="NaN or infinite"):
        J.T @ torch.full((rows, 2), float("inf"), dtype=F64)
    with pytest.raises(ValueError, match="dtype"):
        J @ torch.zeros(D, dtype=torch.float32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        J @ np.zeros(D)
    with pytest.raises(ValueError, match="parameter-shaped input"):
        J @ [torch.zeros(5, 4, dtype=F64)]
    with pytest.raises(TypeError, match="JacobianTranspose"):
        J.T @ [torch.zeros(5, 4, dtype=F64)]
    with pytest.raises(ValueError, match="num_data=16"):
        cc.Jacobian(model, params, data, num_data=16)
    with pytest.raises(TypeError, match="loss_func is None"):
        cc.GGN(model, None, params, data)


class TanhWithoutJvp(torch.autograd.Function):
    """``tanh`` with a differentiable backward and no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class CustomTanhMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.second(TanhWithoutJvp.apply(self.first(x)))


def test_jacobian_takes_the_reverse_mode_route_without_forward_ad():
    torch.manual_seed(0)
    model = CustomTanhMLP().to(F64).eval()
    X = torch.randn(7, 4, dtype=F64)
    data = [(X[:4], torch.zeros(4, 3, dtype=F64)), (X[4:], torch.zeros(3, 3, dtype=F64))]
    params = list(model.parameters())
    J = cc.Jacobian(model, params, data)
    assert_close(J.to_dense(), dense_jacobian(model, params, data))


def test_jacobian_check_deterministic_catches_dropout():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).to(F64).train()
    data = [(torch.randn(6, 4, dtype=F64), torch.zeros(6, 3, dtype=F64))]
    with pytest.raises(RuntimeError, match="dropout"):
        cc.Jacobian(model, list(model.parameters()), data)


@pytest.mark.parametrize("centered", [False, True], ids=["uncentered", "centered"])
@pytest.mark.parametrize("case", MOMENT_CASES, ids=ids(MOMENT_CASES))
def test_gradient_moments_match_per_example_gradients(case, centered):
    model, loss_func, params, data = case.build()
    M = cc.GradientMoments(model, loss_func, params, data, centered=centered)
    expected = dense_moments(per_example_gradients(model, loss_func, params, data), centered)
    V = random_matrix(M.shape[1], 3)
    assert M.isa(cola.PSD)
    assert M.centered is centered
    assert_close(M.to_dense(), expected)
    assert_close(M @ V, expected @ V)
    assert_close(M @ V[:, 0], expected @ V[:, 0])


def test_gradient_moments_equal_the_empirical_fisher_for_one_term_per_example():
    model, loss_func, params, data = Case("cnn", "ce", "mean", "uneven").build()
    M = cc.GradientMoments(model, loss_func, params, data)
    E = cc.EmpiricalFisher(model, loss_func, params, data)
    assert_close(M.to_dense(), E.to_dense())


def test_gradient_moments_ignore_the_batching_and_take_parameter_shaped_input():
    case = Case("mlp", "mse", "sum", "uneven")
    model, loss_func, params, data = case.build()
    _, _, _, one_batch = case.with_batching("one").build()
    M = cc.GradientMoments(model, loss_func, params, data, centered=True)
    M_one = cc.GradientMoments(model, loss_func, params, one_batch, centered=True)
    V = random_matrix(M.shape[1], 2)
    assert_close(M @ V, M_one @ V)
    shaped = M @ [torch.ones_like(p) for p in params]
    assert [t.shape for t in shaped] == [p.shape for p in params]
    assert_close(flat(shaped), M @ torch.ones(M.shape[1], dtype=F64))
    with pytest.raises(TypeError, match="centered"):
        cc.GradientMoments(model, loss_func, params, data, centered="yes")


@pytest.fixture(scope="module")
def ggn_problem():
    model, loss_func, params, data = Case("mlp", "ce", "mean", "uneven").build()
    G = cc.GGN(model, loss_func, params, data)
    return model, loss_func, params, data, G, G.to_dense()


def block(dense, sizes, rows, columns):
    """``dense[rows, columns]`` for parameters of ``sizes`` (entries) chosen by position."""
    offsets = np.cumsum([0, *sizes])
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in rows])
    columns = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in columns])
    return dense[rows][:, columns]


def test_submatrix_is_the_block_of_the_dense_operator(ggn_problem):
    _, _, params, _, G, dense = ggn_problem
    S = cc.Submatrix(G, [3, 0], [params[1]])
    expected = block(dense, sizes(params), [3, 0], [1])
    U = random_matrix(S.shape[0], 2, seed=1)
    assert S.shape == (3 + 20, 5)
    assert S.row_indices == [3, 0] and S.column_indices == [1]
    assert not S.isa(cola.SelfAdjoint)
    assert_close(S.to_dense(), expected)
    assert_close(U.T @ S, U.T @ expected)
    assert_close(S.T.to_dense(), expected.T)
    assert_close(S.to_scipy().rmatvec(U[:, 0].numpy()), expected.T @ U[:, 0], SCIPY_RTOL)
    shaped = S @ [torch.ones(5, dtype=F64)]
    assert [t.shape for t in shaped] == [(3,), (5, 4)]
    assert_close(flat(shaped), expected @ torch.ones(5, dtype=F64))


def test_a_principal_submatrix_keeps_the_annotation(ggn_problem):
    model, loss_func, params, data, G, dense = ggn_problem
    S = cc.Submatrix(G + 0.5 * cola.ops.I_like(G), [2, 3], [2, 3])
    assert S.isa(cola.PSD)
    assert_close(
        S.to_dense(), block(dense, sizes(params), [2, 3], [2, 3]) + 0.5 * torch.eye(18, dtype=F64)
    )
    K = cc.KFAC(model, loss_func, params, data)
    assert_close(
        cc.Submatrix(K, [0, 1], [2]).to_dense(), block(K.to_dense(), sizes(params), [0, 1], [2])
    )


def test_submatrix_rejects_bad_selections(ggn_problem):
    model, _, params, _, G, _ = ggn_problem
    with pytest.raises(ValueError, match="more than once"):
        cc.Submatrix(G, [0, params[0]], [1])
    with pytest.raises(ValueError, match="column_params\\[0\\] = 4"):
        cc.Submatrix(G, [0], [4])
    with pytest.raises(ValueError, match="row_params is empty"):
        cc.Submatrix(G, [], [1])
    with pytest.raises(ValueError, match="neither a position"):
        cc.Submatrix(G, [params[0].clone()], [1])
    with pytest.raises(TypeError, match="list of positions"):
        cc.Submatrix(G, 0, [1])
    with pytest.raises(TypeError, match="operator over a model's parameters"):
        cc.Submatrix(cola.ops.Dense(torch.eye(3, dtype=F64)), [0], [0])
    with pytest.raises(ValueError, match="column parameters"):
        cc.Submatrix(G, [0], [1]) @ [torch.ones(4, dtype=F64)]


# ------------------------------------------------------------------------------------ JAX

# Each distinct batch shape and column count compiles new programs, so the JAX tests use
# one batch of 15 examples except where the batching itself is tested, few column counts,
# and skip the determinism check (its code is the torch tests').


def jax_dense_jacobian(problem):
    flat_params, unravel = ravel_pytree(problem.params)
    X = jnp.concatenate([x for x, _ in problem.data])
    return jax.jit(jax.jacrev(lambda t: problem.model_fn(unravel(t), X).reshape(-1)))(flat_params)


def jax_normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


@pytest.mark.parametrize("name,loss", [("mlp", "mse"), ("cnn", "ce")])
def test_jax_jacobian_matches_jacrev(jax_float64, name, loss):
    problem = build_jax_problem(Case(name, loss, "mean", "one"))
    expected = jax_dense_jacobian(problem)
    _, unravel = ravel_pytree(problem.params)
    J = cc.Jacobian(problem.model_fn, problem.params, problem.data, check_deterministic=False)
    u, v = jax_normal(1, (J.shape[0],)), jax_normal(0, (J.shape[1],))
    assert J.shape == expected.shape
    assert_close(J.to_dense(), expected)
    assert_close(J @ unravel(v), expected @ v)
    assert_close(J.T @ u, expected.T @ u)
    assert_close(u @ J, u @ expected)
    with pytest.raises(TypeError, match="jax.Array"):
        J @ np.zeros(J.shape[1])
    with pytest.raises(TypeError, match="loss_func is None"):
        cc.GGN(problem.model_fn, None, problem.params, problem.data)


def test_jax_jacobian_ignores_the_batching(jax_float64):
    problem = build_jax_problem(Case("mlp", "mse", "mean", "uneven"))
    expected = jax_dense_jacobian(problem)
    JT = cc.JacobianTranspose(
        problem.model_fn, problem.params, problem.data, check_deterministic=False
    )
    u, v = jax_normal(1, (JT.shape[1],)), jax_normal(0, (JT.shape[0],))
    assert_close(JT @ u, expected.T @ u)
    assert_close(JT.T @ v, expected @ v)


@pytest.mark.parametrize(
    "case,centered",
    [(Case("mlp", "mse", "mean", "uneven"), True), (Case("cnn", "ce", "sum", "one"), False)],
    ids=["mlp-mse-mean-uneven-centered", "cnn-ce-sum-one-uncentered"],
)
def test_jax_gradient_moments_match_per_example_gradients(jax_float64, case, centered):
    problem = build_jax_problem(case)
    flat_params, unravel = ravel_pytree(problem.params)
    X = jnp.concatenate([x for x, _ in problem.data])
    Y = jnp.concatenate([y for _, y in problem.data])

    @jax.jit
    def example_gradient(t, x, y):
        return jax.grad(
            lambda t: total_loss(case.loss, case.reduction, problem.model_fn(unravel(t), x), y)
        )(t)

    gradients = [example_gradient(flat_params, X[n : n + 1], Y[n : n + 1]) for n in range(15)]
    expected = dense_moments(torch.from_numpy(np.stack(gradients)), centered).numpy()
    M = cc.GradientMoments(*problem.args, centered=centered, check_deterministic=False)
    assert_close(M.to_dense(), expected)
    S = cc.Submatrix(M, [0], [1, 2])
    leaf_sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(problem.params)]
    assert_close(S.to_dense(), block(expected, leaf_sizes, [0], [1, 2]))
