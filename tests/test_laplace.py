"""The Laplace posterior against dense computations of the same formulas."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import cola_curvature as cc
from cola_curvature.matfree._random import rademacher
from tests.reference import dense_ggn

F64 = torch.float64


def regression_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).to(F64)
    X = 8 * torch.rand(30, 1, dtype=F64)
    y = torch.sin(X) + 0.3 * torch.randn(30, 1, dtype=F64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        optimizer.step()
    return model, nn.MSELoss(), list(model.parameters()), [(X[:20], y[:20]), (X[20:], y[20:])]


def classification_problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    X, y = torch.randn(25, 2, dtype=F64), torch.randint(0, 3, (25,))
    return (
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        [(X[:10], y[:10]), (X[10:], y[10:])],
    )


def jacobian(model, X):
    """Explicit Jacobian of the outputs w.r.t. all parameters, shape ``(N, C, D)``."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    jac = jacrev(
        lambda *ps: functional_call(model, dict(zip(names, ps, strict=True)), (X,)),
        argnums=tuple(range(len(params))),
    )(*params)
    return torch.cat([j.reshape(*j.shape[:2], -1) for j in jac], dim=-1)


def dense_evidence(model, loss_func, params, data, curvature, delta, sigma, regression):
    X = torch.cat([x for x, _ in data])
    Y = torch.cat([t for _, t in data])
    theta = torch.cat([p.detach().flatten() for p in params])
    D = theta.numel()
    posterior = curvature / sigma**2 + delta * torch.eye(D, dtype=F64)
    with torch.no_grad():
        f = model(X)
    if regression:
        nll = ((f - Y) ** 2).sum() / (2 * sigma**2) + 0.5 * f.numel() * math.log(
            2 * math.pi * sigma**2
        )
    else:
        nll = nn.functional.cross_entropy(f, Y, reduction="sum")
    evidence = -nll - 0.5 * delta * (theta**2).sum() + 0.5 * D * math.log(delta)
    return evidence - 0.5 * torch.logdet(posterior), posterior


@pytest.mark.parametrize("curvature", ["full", "kfac", "ekfac", "diag"])
@pytest.mark.parametrize(
    "problem", [regression_problem, classification_problem], ids=["regression", "classification"]
)
def test_evidence_and_predictive_match_dense_formulas(problem, curvature):
    model, loss_func, params, data = problem()
    regression = isinstance(loss_func, nn.MSELoss)
    sigma = 0.4 if regression else 1.0
    laplace = cc.Laplace(
        model, loss_func, params, data, curvature=curvature, prior_precision=2.0, sigma_noise=sigma
    )
    H = laplace.curvature.to_dense()
    if curvature == "full":
        scale = 0.5 if regression else 1.0
        summed = type(loss_func)(reduction="sum")
        assert torch.allclose(
            H, scale * dense_ggn(model, summed, params, data), rtol=1e-10, atol=1e-12
        )
    expected, posterior = dense_evidence(model, loss_func, params, data, H, 2.0, sigma, regression)
    assert abs(laplace.log_marginal_likelihood() - expected) < 1e-10 * abs(expected)
    X = data[0][0][:4]
    mean, covariance = laplace.predictive(X)
    J = jacobian(model, X)
    rows = J.reshape(-1, J.shape[-1])
    full = (rows @ torch.linalg.solve(posterior, rows.T)).reshape(4, -1, 4, J.shape[1])
    expected_cov = torch.stack([full[n, :, n, :] for n in range(4)])
    assert torch.allclose(covariance, expected_cov, rtol=1e-9, atol=1e-12)
    assert torch.allclose(mean, model(X).detach())


def test_evidence_is_differentiable_and_optimisation_improves_it():
    model, loss_func, params, data = regression_problem()
    laplace = cc.Laplace(model, loss_func, params, data, curvature="kfac", sigma_noise=1.0)
    delta = torch.tensor(1.0, dtype=F64, requires_grad=True)
    sigma = torch.tensor(1.0, dtype=F64, requires_grad=True)
    laplace.log_marginal_likelihood(delta, sigma).backward()
    step = 1e-6
    for variable in (delta, sigma):
        plus, minus = (variable.detach() + step, variable.detach() - step)
        args = (
            (lambda v: (v, sigma.detach()))
            if variable is delta
            else (lambda v: (delta.detach(), v))
        )
        numeric = (
            laplace.log_marginal_likelihood(*args(plus))
            - laplace.log_marginal_likelihood(*args(minus))
        ) / (2 * step)
        assert torch.allclose(variable.grad, numeric, rtol=1e-5)
    before = laplace.log_marginal_likelihood()
    laplace.optimize_prior_precision(steps=60, lr=0.1, progressbar=False)
    assert laplace.log_marginal_likelihood() > before
    residual = (model(torch.cat([x for x, _ in data])) - torch.cat([t for _, t in data])).std()
    assert 0.5 * residual < laplace.sigma_noise < 2 * residual


def test_samples_have_the_posterior_covariance():
    model, loss_func, params, data = classification_problem()
    laplace = cc.Laplace(model, loss_func, params, data, curvature="kfac", prior_precision=1.0)
    samples = laplace.sample(20000, seed=0)
    covariance = torch.linalg.inv(laplace.posterior_precision().to_dense())
    assert torch.allclose(samples.mean(1), laplace._mean, atol=0.05)
    assert ((torch.cov(samples) - covariance).norm() / covariance.norm()) < 0.05


def test_probit_probabilities_are_a_distribution_and_shrink_confidence():
    model, loss_func, params, data = classification_problem()
    laplace = cc.Laplace(model, loss_func, params, data, curvature="full", prior_precision=0.5)
    X = data[0][0]
    probabilities = laplace.predictive_probabilities(X)
    assert torch.allclose(probabilities.sum(-1), torch.ones(X.shape[0], dtype=F64))
    plain = model(X).softmax(-1).detach()
    assert (probabilities.max(-1).values <= plain.max(-1).values + 1e-12).all()
    sampled = laplace.predictive_probabilities(X, method="mc", num_samples=20000, seed=1)
    assert torch.allclose(sampled.sum(-1), torch.ones(X.shape[0], dtype=F64))
    assert (sampled - probabilities).abs().max() < 0.05
    with pytest.raises(ValueError, match="expected one of 'probit', 'mc'"):
        laplace.predictive_probabilities(X, method="laplace-bridge")


def test_bad_input():
    model, loss_func, params, data = regression_problem()
    with pytest.raises(ValueError, match="curvature 'diagonal'"):
        cc.Laplace(model, loss_func, params, data, curvature="diagonal")
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        cc.Laplace(model, loss_func, params, data, prior_precision=0.0)
    model_c, loss_c, params_c, data_c = classification_problem()
    with pytest.raises(ValueError, match="regression"):
        cc.Laplace(model_c, loss_c, params_c, data_c, sigma_noise=2.0)
    laplace = cc.Laplace(model, loss_func, params, data, curvature="kfac")
    with pytest.raises(ValueError, match="sigma_noise must be positive"):
        laplace.log_marginal_likelihood(sigma_noise=-1.0)
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        laplace.log_marginal_likelihood(prior_precision=0.0)
    with pytest.raises(ValueError, match=r"training inputs were \(N, 1\)"):
        laplace.predictive(torch.zeros(3, 2, dtype=F64))


@pytest.mark.parametrize(
    "problem", [regression_problem, classification_problem], ids=["regression", "classification"]
)
def test_matrix_free_ggn_posterior_matches_the_full_one(problem):
    model, loss_func, params, data = problem()
    regression = isinstance(loss_func, nn.MSELoss)
    sigma = 0.4 if regression else 1.0
    options = dict(prior_precision=2.0, sigma_noise=sigma)
    full = cc.Laplace(model, loss_func, params, data, curvature="full", **options)
    D = full.curvature.shape[0]
    # D Lanczos steps make each probe's quadrature exact: the only error left is Hutchinson's
    slq = cc.SLQ(num_probes=4, num_steps=D, seed=3)
    ggn = cc.Laplace(model, loss_func, params, data, curvature="ggn", slq=slq, **options)
    assert isinstance(ggn.posterior_precision(), cc.ShiftedCurvature)
    P = full.posterior_precision().to_dense()
    eigenvalues, U = torch.linalg.eigh(P)
    Z = rademacher(ggn.posterior_precision(), 4, 3)
    hutchinson = torch.einsum("ij,ik,kj->", Z, (U * eigenvalues.log()) @ U.T, Z) / 4
    assert abs(ggn.log_det_posterior_precision() - hutchinson) < 1e-9 * abs(hutchinson)
    evidence_gap = ggn.log_marginal_likelihood() - full.log_marginal_likelihood()
    assert abs(evidence_gap - 0.5 * (torch.logdet(P) - hutchinson)) < 1e-9 * abs(hutchinson)
    X = data[0][0][:3]
    _, expected = full.predictive(X)
    _, covariance = ggn.predictive(X)
    assert torch.allclose(covariance, expected, rtol=1e-7, atol=1e-10)
    # the cached quadrature is differentiable in δ and σ, with no new product with G
    delta = torch.tensor(2.0, dtype=F64, requires_grad=True)
    ggn.log_marginal_likelihood(prior_precision=delta).backward()
    step = 1e-6
    numeric = (
        ggn.log_marginal_likelihood(prior_precision=2.0 + step)
        - ggn.log_marginal_likelihood(prior_precision=2.0 - step)
    ) / (2 * step)
    assert abs(delta.grad - numeric) < 1e-6 * abs(numeric)
    # P^{-1/2} by Lanczos: the same draws as the full posterior's exact factor
    assert torch.allclose(ggn.sample(3, seed=4), full.sample(3, seed=4), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "problem", [regression_problem, classification_problem], ids=["regression", "classification"]
)
def test_small_matrix_free_ggn_evidence_is_exact(problem):
    model, loss_func, params, data = problem()
    options = dict(prior_precision=1.5)
    full = cc.Laplace(model, loss_func, params, data, curvature="full", **options)
    ggn = cc.Laplace(model, loss_func, params, data, curvature="ggn", **options)
    expected = full.log_marginal_likelihood()
    assert abs(ggn.log_marginal_likelihood() - expected) < 1e-10 * abs(expected)
    assert ggn.log_det_standard_error() == 0
    estimated = cc.Laplace(
        model, loss_func, params, data, curvature="ggn", slq=cc.SLQ(num_probes=5), **options
    )
    assert estimated.log_det_standard_error() > 0


def test_per_layer_prior_precision_matches_the_dense_evidence_and_is_tuned():
    model, loss_func, params, data = classification_problem()
    laplace = cc.Laplace(
        model, loss_func, params, data, curvature="kfac", prior_precision=[0.5, 3.0]
    )
    H = laplace.curvature.to_dense()
    # KFAC's blocks are the layers, weight and bias together: 2·5 + 5 and 5·3 + 3 entries
    prior = torch.cat([torch.full((15,), 0.5), torch.full((18,), 3.0)]).to(F64)
    theta = torch.cat([p.detach().flatten() for p in params])
    X, Y = torch.cat([x for x, _ in data]), torch.cat([t for _, t in data])
    with torch.no_grad():
        nll = nn.functional.cross_entropy(model(X), Y, reduction="sum")
    expected = (
        -nll
        - 0.5 * (prior * theta**2).sum()
        + 0.5 * prior.log().sum()
        - 0.5 * torch.logdet(H + torch.diag(prior))
    )
    assert abs(laplace.log_marginal_likelihood() - expected) < 1e-10 * abs(expected)
    before = laplace.log_marginal_likelihood()
    laplace.optimize_prior_precision(steps=30)
    assert laplace.prior_precision.shape == (2,)
    assert laplace.log_marginal_likelihood() > before
    with pytest.raises(ValueError, match="one value per block"):
        cc.Laplace(model, loss_func, params, data, curvature="kfac", prior_precision=[1.0] * 3)
    with pytest.raises(ValueError, match="Kronecker-factored"):
        cc.Laplace(model, loss_func, params, data, curvature="ggn", prior_precision=[1.0, 2.0])


def test_symmetry_curvature_posterior_matches_the_dense_formulas():
    model, loss_func, params, data = regression_problem()
    laplace = cc.Laplace(
        model,
        loss_func,
        params,
        data,
        curvature="symmetry",
        prior_precision=2.0,
        sigma_noise=0.4,
        symmetry_groups="permutation-rows",
    )
    direct = cc.SymmetryCurvature(
        model, nn.MSELoss(reduction="sum"), params, data, groups="permutation-rows"
    )
    H = laplace.curvature.to_dense()
    assert torch.allclose(H, 0.25 * direct.to_dense(), rtol=1e-12, atol=1e-14)
    expected, _ = dense_evidence(model, loss_func, params, data, H, 2.0, 0.4, True)
    assert abs(laplace.log_marginal_likelihood() - expected) < 1e-10 * abs(expected)


@pytest.mark.parametrize(
    ("problem", "curvature", "prior"),
    [
        (regression_problem, "kfac", 2.0),
        (regression_problem, "full", 0.7),
        (classification_problem, "ekfac", [0.5, 3.0]),
    ],
    ids=["regression-kfac", "regression-full", "classification-per-layer"],
)
def test_closed_form_evidence_gradient_equals_autograd(problem, curvature, prior):
    model, loss_func, params, data = problem()
    regression = isinstance(loss_func, nn.MSELoss)
    laplace = cc.Laplace(model, loss_func, params, data, curvature=curvature, prior_precision=prior)
    log_delta = torch.tensor(prior, dtype=F64).log().requires_grad_(True)
    log_sigma = torch.tensor(0.4 if regression else 1.0, dtype=F64).log().requires_grad_(True)
    evidence = laplace.log_marginal_likelihood(log_delta.exp(), log_sigma.exp())
    expected = torch.autograd.grad(evidence, [log_delta, log_sigma], allow_unused=True)
    closed = laplace.evidence_gradient(log_delta.exp().detach(), log_sigma.exp().detach())
    assert torch.allclose(closed[0], expected[0], rtol=1e-10, atol=1e-12)
    if regression:
        assert torch.allclose(closed[1], expected[1], rtol=1e-10, atol=1e-12)


def test_a_user_built_matrix_free_curvature_is_used_as_given():
    model, loss_func, params, data = classification_problem()
    fisher = cc.FisherMC(model, nn.CrossEntropyLoss(reduction="sum"), params, data, mc_samples=3)
    D = fisher.shape[0]
    slq = cc.SLQ(num_probes=3, num_steps=D, seed=2)
    laplace = cc.Laplace(model, loss_func, params, data, curvature=fisher, slq=slq)
    P = fisher @ torch.eye(D, dtype=F64) + torch.eye(D, dtype=F64)
    eigenvalues, U = torch.linalg.eigh(P)
    Z = rademacher(laplace.posterior_precision(), 3, 2)
    expected = torch.einsum("ij,ik,kj->", Z, (U * eigenvalues.log()) @ U.T, Z) / 3
    assert abs(laplace.log_det_posterior_precision() - expected) < 1e-9 * abs(expected)
    with pytest.raises(ValueError, match="must be PSD"):
        cc.Laplace(
            model, loss_func, params, data, curvature=cc.Hessian(model, loss_func, params, data)
        )
    with pytest.raises(ValueError, match="method must be 'marglik'"):
        laplace.optimize_prior_precision(steps=1, method="gridsearch")
