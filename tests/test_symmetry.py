"""Symmetry-averaged curvature: closed forms vs brute-force group averages, rules vs dense."""

import itertools

import cola
import jax
import numpy as np
import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests import reference
from tests.cases import Case
from tests.jax_cases import build_jax_problem, torch_to_jax_order

F64 = torch.float64
GROUPS = ["orthogonal-rows", "orthogonal-cols", "orthogonal-both", "permutation-rows"]


def haar_orthogonal(num, size, generator):
    """``num`` Haar-distributed orthogonal matrices (QR of Gaussians, signs fixed by R)."""
    Q, R = torch.linalg.qr(torch.randn(num, size, size, dtype=F64, generator=generator))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]


def averaged_outer_product(transformed):
    """``mean_s vec(G_s) vec(G_s)ᵀ`` of a stack ``(S, m, n)`` (row-major ``vec``)."""
    flat = transformed.reshape(transformed.shape[0], -1)
    return flat.T @ flat / flat.shape[0]


def monte_carlo_average(G, group, num_samples, generator):
    m, n = G.shape
    if group == "orthogonal-rows":
        return averaged_outer_product(haar_orthogonal(num_samples, m, generator) @ G)
    if group == "orthogonal-cols":
        return averaged_outer_product(G @ haar_orthogonal(num_samples, n, generator))
    if group == "orthogonal-both":
        left = haar_orthogonal(num_samples, m, generator)
        return averaged_outer_product(left @ G @ haar_orthogonal(num_samples, n, generator))
    permutations = torch.stack([torch.randperm(m, generator=generator) for _ in range(num_samples)])
    return averaged_outer_product(G[permutations])


def exact_permutation_average(G):
    rows = list(itertools.permutations(range(G.shape[0])))
    return averaged_outer_product(torch.stack([G[list(p)] for p in rows]))


@pytest.mark.parametrize("group", GROUPS)
def test_closed_forms_equal_the_monte_carlo_group_average(group):
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(4, 3, dtype=F64, generator=generator)
    closed = cc.symmetry_block(G, group).to_dense()
    sampled = monte_carlo_average(G, group, 40_000, generator)
    # sampling error of a mean of 40k bounded outer products: ~1% of the scale of g gᵀ
    assert (closed - sampled).abs().max() < 0.03 * (G**2).sum()
    assert torch.allclose(closed, closed.T) and torch.linalg.eigvalsh(closed).min() > -1e-12
    assert abs(torch.trace(closed) - (G**2).sum()) < 1e-12  # every group preserves ‖g‖²


@pytest.mark.parametrize("num_rows", [1, 2, 3, 5])
def test_permutation_closed_form_is_the_exact_average_over_all_permutations(num_rows):
    G = torch.randn(num_rows, 3, dtype=F64, generator=torch.Generator().manual_seed(num_rows))
    closed = cc.symmetry_block(G, "permutation-rows")
    assert (closed.to_dense() - exact_permutation_average(G)).abs().max() < 1e-13
    A, B = closed.factors()
    eye, ones = torch.eye(num_rows, dtype=F64), torch.ones(num_rows, num_rows, dtype=F64)
    assert (torch.kron(eye, A) + torch.kron(ones, B) - closed.to_dense()).abs().max() < 1e-13


def structured(block):
    """The block as a one-block Kronecker-factored operator (identity permutation)."""
    return cc.KroneckerFactored([block], torch.arange(block.shape[0]))


@pytest.mark.parametrize("group", GROUPS)
def test_every_rule_matches_numpy_on_the_dense_matrix(group):
    G = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    C = structured(cc.symmetry_block(G, group))
    damped = C + 0.3 * cola.ops.I_like(C)
    dense = C.to_dense().numpy() + 0.3 * np.eye(12)
    values, vectors = np.linalg.eigh(dense)
    v = np.random.default_rng(0).standard_normal((12, 2))

    def close(actual, expected):
        return np.abs(np.asarray(actual) - expected).max() < 1e-10 * max(1, np.abs(expected).max())

    assert isinstance(damped, cc.KroneckerFactored)
    assert close(cola.linalg.inv(damped) @ torch.as_tensor(v), np.linalg.solve(dense, v))
    assert close(cola.linalg.logdet(damped), np.linalg.slogdet(dense)[1])
    assert close(cola.linalg.trace(damped), np.trace(dense))
    assert close(cola.linalg.diag(damped), np.diag(dense))
    root = (vectors * np.sqrt(values)) @ vectors.T
    assert close(cola.linalg.sqrt(damped).to_dense(), root)
    assert close(cola.linalg.isqrt(damped).to_dense(), np.linalg.inv(root))
    top, top_vectors = cola.linalg.eig(damped, 3, "LA")
    assert close(top, values[::-1][:3])
    V = top_vectors.to_dense().numpy()
    assert close(dense @ V, V * top.numpy())


def test_permutation_logdet_has_the_closed_form():
    G = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    block = cc.symmetry_block(G, "permutation-rows")
    A, B = block.factors()
    eye3 = torch.eye(3, dtype=F64)
    closed = torch.logdet(A + 5 * B + 0.1 * eye3) + 4 * torch.logdet(A + 0.1 * eye3)
    dense = block.to_dense() + 0.1 * torch.eye(15, dtype=F64)
    assert abs(closed - torch.linalg.slogdet(dense)[1]) < 1e-10
    assert (
        abs(cola.linalg.logdet(structured(block) + 0.1 * cola.ops.I_like(block)) - closed) < 1e-10
    )


@pytest.mark.parametrize(
    ("group", "shape"), [("orthogonal-rows", (6, 3)), ("orthogonal-cols", (3, 6))]
)
def test_one_sided_average_gives_muon_polar_factor_as_damping_vanishes(group, shape):
    G = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    U, _, Vt = torch.linalg.svd(G, full_matrices=False)
    scale = shape[0] if group == "orthogonal-rows" else shape[1]
    polar = (scale**0.5 * U @ Vt).reshape(-1)
    C = structured(cc.symmetry_block(G, group))
    errors = [
        (cc.preconditioned_step(C, G.reshape(-1), eps) - polar).norm() / polar.norm()
        for eps in (1e-2, 1e-4, 1e-8, 1e-12)
    ]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-6


def test_product_of_one_sided_averages_is_shampoo():
    G = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    rows = cc.symmetry_block(G, "orthogonal-rows").to_dense()
    cols = cc.symmetry_block(G, "orthogonal-cols").to_dense()
    shampoo = cc.shampoo_block(G)
    assert (rows @ cols - shampoo.to_dense()).abs().max() < 1e-12
    assert (rows @ cols - cols @ rows).abs().max() < 1e-12  # they commute
    L, R = (G @ G.T / 5).numpy(), (G.T @ G / 4).numpy()
    eps = 1e-3
    values, vectors = np.linalg.eigh(np.kron(L, R) + eps * np.eye(20))
    expected = (vectors * values**-0.25) @ vectors.T @ G.reshape(-1).numpy()
    step = cc.preconditioned_step(structured(shampoo), G.reshape(-1), eps, power=-0.25)
    assert np.abs(step.numpy() - expected).max() < 1e-10 * np.abs(expected).max()


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    X, y = torch.randn(9, 3, dtype=F64), torch.randn(9, 2, dtype=F64)
    data = [(X[:4], y[:4]), (X[4:7], y[4:7]), (X[7:], y[7:])]
    return model, nn.MSELoss(), list(model.parameters()), data


def dense_block(G, group):
    """The group average of ``vec(G) vec(G)ᵀ`` by brute force (exact for permutations)."""
    if group == "permutation-rows":
        return exact_permutation_average(G)
    m, n = G.shape
    if group == "orthogonal-rows":
        return torch.kron(torch.eye(m, dtype=F64), G.T @ G / m)
    if group == "orthogonal-cols":
        return torch.kron(G @ G.T / n, torch.eye(n, dtype=F64))
    return (G**2).sum() / (m * n) * torch.eye(m * n, dtype=F64)


def assemble(gradients, parts, sizes):
    """Dense ``C`` in the user's order from per-part gradient lists: scatter each block."""
    D = sum(sizes)
    offsets = np.cumsum([0, *sizes])
    C = torch.zeros(D, D, dtype=F64)
    for members, group in parts:
        views = [gradients[i].reshape(gradients[i].shape[0], -1) for i in members]
        G = torch.cat(views, dim=1)
        index = torch.cat(
            [offsets[i] + torch.arange(sizes[i]).reshape(G.shape[0], -1) for i in members], dim=1
        ).reshape(-1)
        C[index[:, None], index[None, :]] = dense_block(G, group)
    return C


GROUPINGS = {
    "joint-hidden-units": {
        ("0.weight", "0.bias"): "permutation-rows",
        "2.weight": "orthogonal-cols",
        "2.bias": "orthogonal-both",
    },
    "out-of-order": {
        "2.weight": "orthogonal-rows",
        ("0.bias", "0.weight"): "permutation-rows",
        "2.bias": "orthogonal-rows",
    },
}


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_operator_equals_brute_force_averages_of_the_full_gradient(grouping):
    model, loss_func, params, data = mlp_problem()
    groups = GROUPINGS[grouping]
    C = cc.SymmetryCurvature(model, loss_func, params, data, groups=groups)
    total_loss, theta = reference.total_loss_function(model, loss_func, params, data)
    gradient = torch.func.grad(total_loss)(theta)
    _, unflatten = reference.flat_params_and_unflatten(params)
    gradients = unflatten(gradient)
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    parts = [
        (tuple(names.index(n) for n in ((k,) if isinstance(k, str) else k)), g)
        for k, g in groups.items()
    ]
    expected = assemble(gradients, parts, [p.numel() for p in params])
    assert (C.to_dense() - expected).abs().max() < 1e-12 * expected.abs().max()
    assert C.isa(cola.PSD)


def test_moving_average_weights_the_batches_and_debiases():
    model, loss_func, params, data = mlp_problem()
    beta = 0.7
    C = cc.SymmetryCurvature(model, loss_func, params, data, groups="orthogonal-rows", ema=beta)
    _, unflatten = reference.flat_params_and_unflatten(params)
    expected, weights = 0, [(1 - beta) * beta ** (2 - t) for t in range(3)]
    for weight, batch in zip(weights, data, strict=True):
        total_loss, theta = reference.total_loss_function(model, loss_func, params, [batch])
        gradients = unflatten(torch.func.grad(total_loss)(theta))
        parts = [((i,), "orthogonal-rows") for i in range(4)]
        expected = expected + weight * assemble(gradients, parts, [p.numel() for p in params])
    expected = expected / (1 - beta**3)
    assert (C.to_dense() - expected).abs().max() < 1e-12 * expected.abs().max()


def test_jax_and_torch_give_the_same_operator():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        problem = build_jax_problem(Case("mlp", "ce", "mean", "uneven"))
        model, loss_func, params, data = problem.torch_problem
        torch_groups = {
            ("0.weight", "0.bias"): "permutation-rows",
            "2.weight": "orthogonal-cols",
            "2.bias": "orthogonal-both",
        }
        jax_groups = {
            tuple(f"['{name}']" for name in key) if isinstance(key, tuple) else f"['{key}']": group
            for key, group in torch_groups.items()
        }
        torch_C = cc.SymmetryCurvature(model, loss_func, params, data, groups=torch_groups)
        jax_C = cc.SymmetryCurvature(*problem.args, groups=jax_groups)
        order = torch_to_jax_order(model)
        expected = torch_C.to_dense().numpy()[np.ix_(order, order)]
        assert np.abs(np.asarray(jax_C.to_dense()) - expected).max() < 1e-12
        damped = jax_C + 0.1 * cola.ops.I_like(jax_C)
        assert (
            abs(
                float(cola.linalg.logdet(damped))
                - np.linalg.slogdet(expected + 0.1 * np.eye(len(order)))[1]
            )
            < 1e-9
        )
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_parameter_shaped_step_and_bad_groups():
    model, loss_func, params, data = mlp_problem()
    C = cc.SymmetryCurvature(model, loss_func, params, data, groups="permutation-rows")
    step = cc.preconditioned_step(C, [torch.ones_like(p) for p in params], damping=0.1)
    assert [s.shape for s in step] == [p.shape for p in params]
    with pytest.raises(ValueError, match="missing: \\['2.bias'\\]"):
        cc.SymmetryCurvature(
            model,
            loss_func,
            params,
            data,
            groups={
                "0.weight": "orthogonal-rows",
                "0.bias": "orthogonal-rows",
                "2.weight": "orthogonal-rows",
            },
        )
    with pytest.raises(ValueError, match="symmetry group"):
        cc.SymmetryCurvature(model, loss_func, params, data, groups="rotation")
    with pytest.raises(ValueError, match="rows"):
        cc.SymmetryCurvature(
            model,
            loss_func,
            params,
            data,
            groups={
                ("0.weight", "2.weight"): "permutation-rows",
                "0.bias": "orthogonal-rows",
                "2.bias": "orthogonal-rows",
            },
        )
    with pytest.raises(ValueError, match="ema"):
        cc.SymmetryCurvature(model, loss_func, params, data, ema=1.0)
    with pytest.raises(TypeError, match="Kronecker-factored"):
        cc.preconditioned_step(cc.GGN(model, loss_func, params, data), torch.ones(C.shape[0]), 0.1)


def test_hidden_unit_permutation_across_two_layers_is_the_brute_force_average():
    # permuting hidden units: W1 -> ΠW1, b1 -> Πb1, W2 -> W2Πᵀ; b2 is untouched
    model, loss_func, params, data = mlp_problem()
    groups = {
        ("0.weight", "0.bias", cc.Transposed("2.weight")): "permutation-rows",
        "2.bias": "orthogonal-both",
    }
    C = cc.SymmetryCurvature(model, loss_func, params, data, groups=groups).to_dense()
    total_loss, theta = reference.total_loss_function(model, loss_func, params, data)
    _, unflatten = reference.flat_params_and_unflatten(params)
    W1, b1, W2, b2 = unflatten(torch.func.grad(total_loss)(theta))
    weights = unflatten(theta)
    average = 0
    permutations = list(itertools.permutations(range(4)))
    for perm in permutations:
        perm = list(perm)
        permuted = torch.cat([W1[perm].reshape(-1), b1[perm], W2[:, perm].reshape(-1)])
        average = average + torch.outer(permuted, permuted) / len(permutations)
        # the permutation is a symmetry: the loss of the permuted weights is unchanged
        moved = [weights[0][perm], weights[1][perm], weights[2][:, perm], weights[3]]
        assert (
            abs(total_loss(torch.cat([w.reshape(-1) for w in moved])) - total_loss(theta)) < 1e-12
        )
    coupled = slice(0, 12 + 4 + 8)
    assert (C[coupled, coupled] - average).abs().max() < 1e-13
    assert (C[coupled, 24:] == 0).all()
    assert abs(C[24:, 24:] - (b2**2).sum() / 2 * torch.eye(2, dtype=F64)).max() < 1e-13
    with pytest.raises(ValueError, match="rows"):
        bad = {
            ("0.weight", "2.weight"): "permutation-rows",
            "0.bias": "orthogonal-rows",
            "2.bias": "orthogonal-rows",
        }
        cc.SymmetryCurvature(model, loss_func, params, data, groups=bad)
