"""cc.optim: steps against dense float64 references, EMA, intervals, state, JAX twin, KFAC."""

import copy
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests._tols import EXACT_RTOL

F64 = torch.float64
GROUPS = ["orthogonal-rows", "orthogonal-cols", "orthogonal-both", "permutation-rows"]
#: A linear weight, a convolution kernel (3 × 8 as a matrix) and a bias (diagonal).
SHAPES = [(4, 3), (3, 2, 2, 2), (4,)]


def generator(seed):
    return torch.Generator().manual_seed(seed)


def dense_average(G, group):
    """The group average of ``vec(G) vec(G)ᵀ`` in dense float64 (permutations: all of them)."""
    m, n = G.shape
    if group == "orthogonal-rows":
        return torch.kron(torch.eye(m, dtype=F64), G.T @ G / m)
    if group == "orthogonal-cols":
        return torch.kron(G @ G.T / n, torch.eye(n, dtype=F64))
    if group == "orthogonal-both":
        return (G**2).sum() / (m * n) * torch.eye(m * n, dtype=F64)
    flats = [G[list(p)].reshape(-1) for p in itertools.permutations(range(m))]
    return sum(torch.outer(f, f) for f in flats) / len(flats)


def matrix_power(M, power):
    """``M^p`` of a symmetric positive definite matrix by ``torch.linalg.eigh``."""
    values, vectors = torch.linalg.eigh(M)
    return (vectors * values**power) @ vectors.T


def dense_direction(gradient, group, damping, power, curvature=None):
    """``(C + εI)^p g`` with ``C`` the dense average (a diagonal ``g ⊙ g`` for a vector)."""
    if gradient.ndim < 2:
        return gradient * (gradient**2 + damping) ** power
    G = gradient.reshape(gradient.shape[0], -1)
    C = dense_average(G, group) if curvature is None else curvature
    eye = torch.eye(C.shape[0], dtype=F64)
    return (matrix_power(C + damping * eye, power) @ G.reshape(-1)).reshape(gradient.shape)


def close(actual, expected, rtol=EXACT_RTOL):
    return (actual - expected).norm() <= rtol * expected.norm()


def leaves(shapes, seed):
    return [torch.randn(*s, dtype=F64, generator=generator(seed + i)) for i, s in enumerate(shapes)]


def step_with(optimizer, params, gradients):
    for param, gradient in zip(params, gradients, strict=True):
        param.grad = gradient.clone()
    optimizer.step()


@pytest.mark.parametrize("power", [-0.5, -1.0])
@pytest.mark.parametrize("group", GROUPS)
def test_step_is_the_preconditioned_step_of_the_current_gradient(group, power):
    params = [p.requires_grad_() for p in leaves(SHAPES, 0)]
    start = [p.detach().clone() for p in params]
    gradients = leaves(SHAPES, 10)
    lr, damping = 0.1, 1e-3
    opt = cc.optim.SymmetryPreconditioned(
        params, lr=lr, groups=group, beta=0.0, damping=damping, power=power
    )
    step_with(opt, params, gradients)
    for param, p0, g in zip(params, start, gradients, strict=True):
        dense = dense_direction(g, group, damping, power)
        assert close(param.detach(), p0 - lr * dense)
        if g.ndim >= 2:
            G = g.reshape(g.shape[0], -1)
            C = cc.KroneckerFactored([cc.symmetry_block(G, group)], torch.arange(G.numel()))
            step = cc.preconditioned_step(C, G.reshape(-1), damping, power).reshape(g.shape)
            assert close(param.detach(), p0 - lr * step)


@pytest.mark.parametrize(
    ("group", "shape"), [("orthogonal-rows", (6, 3)), ("orthogonal-cols", (3, 6))]
)
def test_muon_limit_is_the_scaled_polar_factor(group, shape):
    param = torch.zeros(*shape, dtype=F64, requires_grad=True)
    G = torch.randn(*shape, dtype=F64, generator=generator(3))
    U, sigma, Vt = torch.linalg.svd(G, full_matrices=False)
    scale = shape[0] if group == "orthogonal-rows" else shape[1]
    polar = scale**0.5 * U @ Vt
    for damping in (1e-4, 1e-8):
        param.data.zero_()
        opt = cc.optim.SymmetryPreconditioned(
            [param], lr=1.0, groups=group, beta=0.0, damping=damping
        )
        step_with(opt, [param], [G])
        # singular values of the step: √s σ / √(σ² + s ε), s = scale; relative error ≤ s ε / (2 σ²)
        bound = scale * damping / (2 * sigma.min() ** 2)
        assert (-param.detach() - polar).norm() <= (bound + 1e-12) * polar.norm()


@pytest.mark.parametrize("group", ["orthogonal-rows", "orthogonal-cols"])
def test_two_steps_average_the_statistics_and_give_one_sided_shampoo(group):
    beta, damping, lr = 0.9, 1e-3, 0.1
    param = torch.zeros(4, 5, dtype=F64, requires_grad=True)
    G1, G2 = leaves([(4, 5), (4, 5)], 20)
    opt = cc.optim.SymmetryPreconditioned([param], lr=lr, groups=group, beta=beta, damping=damping)
    step_with(opt, [param], [G1])
    before = param.detach().clone()
    step_with(opt, [param], [G2])
    rows = group == "orthogonal-rows"
    stat1, stat2 = (G1.T @ G1, G2.T @ G2) if rows else (G1 @ G1.T, G2 @ G2.T)
    average = beta * (1 - beta) * stat1 + (1 - beta) * stat2
    assert close(opt.state[param]["statistics"][0], average)
    hat = average / (1 - beta**2) / (4 if rows else 5)
    root = matrix_power(hat + damping * torch.eye(hat.shape[0], dtype=F64), -0.5)
    shampoo = G2 @ root if rows else root @ G2
    assert close(param.detach(), before - lr * shampoo)


def test_permutation_statistics_are_averaged_too():
    beta = 0.5
    param = torch.zeros(3, 2, dtype=F64, requires_grad=True)
    G1, G2 = leaves([(3, 2), (3, 2)], 30)
    opt = cc.optim.SymmetryPreconditioned([param], groups="permutation-rows", beta=beta)
    step_with(opt, [param], [G1])
    step_with(opt, [param], [G2])

    def stats(G):
        s = G.sum(0)
        return G.T @ G, torch.outer(s, s)

    for actual, first, second in zip(
        opt.state[param]["statistics"], stats(G1), stats(G2), strict=True
    ):
        assert close(actual, beta * (1 - beta) * first + (1 - beta) * second)


def test_update_interval_keeps_the_eigenbasis_of_the_refresh():
    lr, damping = 0.1, 1e-3
    param = torch.zeros(5, 3, dtype=F64, requires_grad=True)
    G1, G2, G3 = leaves([(5, 3)] * 3, 40)
    opt = cc.optim.SymmetryPreconditioned(
        [param], lr=lr, beta=0.0, damping=damping, update_interval=2
    )
    step_with(opt, [param], [G1])
    before = param.detach().clone()
    step_with(opt, [param], [G2])
    frozen = dense_average(G1, "orthogonal-rows")
    expected = before - lr * dense_direction(G2, None, damping, -0.5, curvature=frozen)
    assert close(param.detach(), expected)
    before = param.detach().clone()
    step_with(opt, [param], [G3])  # step 3 refreshes
    assert close(
        param.detach(), before - lr * dense_direction(G3, "orthogonal-rows", damping, -0.5)
    )


def test_param_groups_with_and_without_weight_decay():
    decayed, plain = leaves([(4, 3), (3, 4)], 50)
    params = [decayed.requires_grad_(), plain.requires_grad_()]
    start = [p.detach().clone() for p in params]
    gradients = leaves([(4, 3), (3, 4)], 60)
    groups = [
        {"params": [decayed], "weight_decay": 0.1, "lr": 0.2},
        {"params": [plain], "groups": "orthogonal-cols"},
    ]
    opt = cc.optim.SymmetryPreconditioned(groups, lr=0.05, beta=0.0, damping=1e-3)
    step_with(opt, params, gradients)
    d0 = dense_direction(gradients[0], "orthogonal-rows", 1e-3, -0.5)
    d1 = dense_direction(gradients[1], "orthogonal-cols", 1e-3, -0.5)
    assert close(decayed.detach(), start[0] - 0.2 * (d0 + 0.1 * start[0]))
    assert close(plain.detach(), start[1] - 0.05 * d1)


def test_grafting_takes_the_norm_of_adam_or_sgd():
    G = torch.randn(4, 3, dtype=F64, generator=generator(70))
    expected_norms = {"sgd": G.norm(), "adam": (G / (G**2 + 1e-3).sqrt()).norm()}
    for grafting, norm in expected_norms.items():
        param = torch.zeros(4, 3, dtype=F64, requires_grad=True)
        opt = cc.optim.SymmetryPreconditioned(
            [param], lr=1.0, beta=0.0, damping=1e-3, grafting=grafting
        )
        step_with(opt, [param], [G])
        direction = dense_direction(G, "orthogonal-rows", 1e-3, -0.5)
        assert close(-param.detach(), direction * norm / direction.norm())


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)


BATCHES = [
    (
        torch.randn(6, 3, dtype=F64, generator=generator(80 + i)),
        torch.randn(6, 2, dtype=F64, generator=generator(90 + i)),
    )
    for i in range(6)
]


def train(model, opt, batches, with_batch=False):
    for X, y in batches:
        opt.zero_grad()
        nn.MSELoss()(model(X), y).backward()
        opt.step((X, y)) if with_batch else opt.step()


def make_symmetry(model):
    return cc.optim.SymmetryPreconditioned(
        model.parameters(),
        lr=0.05,
        beta=0.9,
        update_interval=2,
        momentum=0.9,
        weight_decay=0.01,
        grafting="adam",
        damping=1e-4,
    )


def make_kfac(model):
    return cc.optim.KFAC(
        model,
        nn.MSELoss(),
        model.parameters(),
        lr=0.1,
        beta=0.9,
        update_interval=2,
        momentum=0.5,
        fisher_type="mc",
        damping=1e-2,
    )


@pytest.mark.parametrize(("make", "with_batch"), [(make_symmetry, False), (make_kfac, True)])
def test_state_dict_round_trip_continues_exactly(make, with_batch):
    model = mlp()
    opt = make(model)
    train(model, opt, BATCHES[:3], with_batch)
    saved_state, saved_params = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    train(model, opt, BATCHES[3:], with_batch)
    resumed = mlp(seed=1)
    resumed.load_state_dict(saved_params)
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(saved_state)
    train(resumed, resumed_opt, BATCHES[3:], with_batch)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def jax_x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


TWIN_OPTIONS = [
    {"groups": "orthogonal-rows", "grafting": "adam", "momentum": 0.9, "weight_decay": 0.01},
    {"groups": "permutation-rows", "grafting": "sgd", "update_interval": 2, "power": -1.0},
]


@pytest.mark.parametrize("options", TWIN_OPTIONS)
def test_jax_twin_matches_torch_for_three_steps(jax_x64, options):
    model = mlp()
    shared = {"beta": 0.9, "damping": 1e-3, **options}
    opt = cc.optim.SymmetryPreconditioned(model.parameters(), lr=0.05, **shared)
    params = [jnp.asarray(p.detach().numpy()) for p in model.parameters()]

    def loss(params, X, y):
        w1, b1, w2, b2 = params
        return jnp.mean((jnp.tanh(X @ w1.T + b1) @ w2.T + b2 - y) ** 2)

    transform = cc.optim.symmetry_preconditioned(0.05, **shared)
    state = transform.init(params)
    update = jax.jit(transform.update)
    for X, y in BATCHES[:3]:
        train(model, opt, [(X, y)])
        grads = jax.grad(loss)(params, jnp.asarray(X.numpy()), jnp.asarray(y.numpy()))
        updates, state = update(grads, state, params)
        params = [p + u for p, u in zip(params, updates, strict=True)]
    for expected, actual in zip(model.parameters(), params, strict=True):
        assert close(torch.tensor(np.asarray(actual)), expected.detach())


def test_jax_twin_chains_in_optax(jax_x64):
    optax = pytest.importorskip("optax")
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)))}
    grads = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((3, 2)))}
    ours = cc.optim.symmetry_preconditioned(0.1, beta=0.0)
    chained = optax.chain(ours, optax.scale(2.0))
    updates, _ = chained.update(grads, chained.init(params), params)
    direct, _ = ours.update(grads, ours.init(params), params)
    assert np.allclose(updates["w"], 2 * direct["w"], rtol=1e-14, atol=0)


def kfac_problem():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    return model, nn.MSELoss(), list(model.parameters())


def test_kfac_step_is_the_damped_newton_step_of_the_batch_and_averages_factors():
    model, loss_func, params = kfac_problem()
    lr, damping, beta = 0.3, 1e-2, 0.8
    opt = cc.optim.KFAC(
        model, loss_func, params, lr=lr, damping=damping, beta=beta, fisher_type="type-2"
    )
    operators = []
    for batch in BATCHES[:2]:
        start = [p.detach().clone() for p in params]
        opt.zero_grad()
        loss_func(model(batch[0]), batch[1]).backward()
        grads = [p.grad.clone() for p in params]
        operators.append(
            cc.KFAC(model, loss_func, params, [batch], fisher_type="type-2", uncovered="diagonal")
        )
        opt.step(batch)
        if len(operators) == 1:
            K = operators[0]
            expected = cc.preconditioned_step(K, grads, damping, power=-1)
            dense = K.to_dense() + damping * torch.eye(K.shape[0], dtype=F64)
            flat = torch.linalg.solve(dense, torch.cat([g.reshape(-1) for g in grads]))
            assert close(torch.cat([e.reshape(-1) for e in expected]), flat)
            for param, p0, e in zip(params, start, expected, strict=True):
                assert close(param.detach(), p0 - lr * e)
    frozen = opt.state["kfac"]["frozen"]
    for averaged, first, second in zip(
        frozen, operators[0].blocks, operators[1].blocks, strict=True
    ):
        if isinstance(first, cc.DiagonalBlock):
            pairs = [(first.values, second.values)]
        else:
            pairs = [
                (first.output_factor, second.output_factor),
                (first.input_factor, second.input_factor),
            ]
        for actual, (a, b) in zip(averaged, pairs, strict=True):
            assert close(actual, (beta * (1 - beta) * a + (1 - beta) * b) / (1 - beta**2))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"damping": -1e-3}, "damping"),
        ({"damping": 0.0}, "damping"),
        ({"groups": "rotations"}, "symmetry group"),
        ({"power": 0.5}, "power"),
        ({"beta": 1.0}, "beta"),
        ({"update_interval": 0}, "update_interval"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"grafting": "lamb"}, "grafting"),
    ],
)
def test_bad_options_are_refused_by_name(options, match):
    param = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        cc.optim.SymmetryPreconditioned([param], **options)
    jax_options = dict(options)
    with pytest.raises(ValueError, match=match.replace("lr", "learning_rate")):
        cc.optim.symmetry_preconditioned(jax_options.pop("lr", 0.1), **jax_options)


def test_kfac_refuses_bad_options_and_a_missing_batch():
    model, loss_func, params = kfac_problem()
    with pytest.raises(ValueError, match="damping"):
        cc.optim.KFAC(model, loss_func, params, damping=-1.0)
    with pytest.raises(ValueError, match="lr"):
        cc.optim.KFAC(model, loss_func, params, lr=-1.0)
    with pytest.raises(ValueError, match="fisher_type"):
        cc.optim.KFAC(model, loss_func, params, fisher_type="hessian")
    opt = cc.optim.KFAC(model, loss_func, params)
    X, y = BATCHES[0]
    loss_func(model(X), y).backward()
    with pytest.raises(ValueError, match="batch"):
        opt.step()
    with pytest.raises(TypeError, match="update_interval"):
        cc.optim.KFAC(model, loss_func, params, update_interval=1.5)


def test_training_a_compiled_model_takes_the_same_steps():
    """``torch.compile`` of the model (graph capture with the ``aot_eager`` backend, no C++
    toolchain needed) leaves the gradients, and so the optimizer's steps, as in eager mode."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    X, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    trained = []
    for compiled in (False, True):
        model = copy.deepcopy(reference)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        optimizer = cc.optim.SymmetryPreconditioned(model.parameters(), lr=0.1, damping=1e-3)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.mse_loss(forward(X), y).backward()
            optimizer.step()
        trained.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert close(trained[1], trained[0])
    assert not torch.equal(trained[0], torch.cat([p.reshape(-1) for p in reference.parameters()]))
