"""The randomized estimators and Lanczos on plain CoLA matrices of known spectrum, torch and JAX."""

import cola
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
import torch

import cola_curvature as cc
from cola_curvature import estimators
from cola_curvature.matfree._random import rademacher
from cola_curvature.matfree.krylov import lanczos_eigenpairs

matplotlib.use("Agg")

DIMENSION = 30
SEEDS = range(200)


pytestmark = pytest.mark.usefixtures("jax_float64")


@pytest.fixture(params=["torch", "jax"])
def backend(request):
    """``(as_operator, to_numpy)`` for one framework."""
    if request.param == "torch":
        return lambda M: cola.PSD(cola.ops.Dense(torch.as_tensor(M))), np.asarray
    return lambda M: cola.PSD(cola.ops.Dense(jnp.asarray(M))), np.asarray


def matrix_with_spectrum(eigenvalues, seed=0):
    """``U diag(λ) Uᵀ`` with a Haar-random orthogonal ``U``."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (U * np.asarray(eigenvalues, dtype=np.float64)) @ U.T


def decaying(dimension=DIMENSION):
    return matrix_with_spectrum(1.0 / np.arange(1, dimension + 1))


def low_rank_dominated(dimension=DIMENSION):
    """Five large eigenvalues over a flat bulk: where sketching beats Hutchinson."""
    return matrix_with_spectrum(np.r_[[100.0, 60.0, 30.0, 20.0, 10.0], np.full(dimension - 5, 0.1)])


def low_rank(rank=5, dimension=DIMENSION):
    return matrix_with_spectrum(np.r_[np.arange(1.0, rank + 1), np.zeros(dimension - rank)])


TRACE_ESTIMATORS = {
    "hutchinson": (estimators.hutchinson_trace, cc.Hutchinson),
    "hutch++": (estimators.hutchpp_trace, cc.HutchPlusPlus),
    "xtrace": (estimators.xtrace, cc.XTrace),
}
DIAGONAL_ESTIMATORS = {
    "hutchinson": (estimators.hutchinson_diagonal, cc.Hutchinson),
    "xdiag": (estimators.xdiag, cc.XDiag),
}


def samples(estimator, alg_type, A, num_matvecs, to_numpy, seeds=SEEDS):
    return np.array(
        [to_numpy(estimator(A, alg_type(num_matvecs=num_matvecs, seed=s))) for s in seeds]
    )


def assert_unbiased(draws, exact, standard_errors=5.0):
    mean = draws.mean(axis=0)
    error = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - exact) <= standard_errors * error + 1e-12)


@pytest.mark.parametrize("name", TRACE_ESTIMATORS)
def test_trace_estimators_are_unbiased_and_improve_with_budget(backend, name):
    as_operator, to_numpy = backend
    M = decaying()
    A = as_operator(M)
    estimator, alg_type = TRACE_ESTIMATORS[name]
    draws = samples(estimator, alg_type, A, 12, to_numpy)
    assert draws.std() > 0  # really random
    assert_unbiased(draws, np.trace(M))
    small = np.median(
        np.abs(samples(estimator, alg_type, A, 12, to_numpy, range(30)) - np.trace(M))
    )
    large = np.median(
        np.abs(samples(estimator, alg_type, A, 48, to_numpy, range(30)) - np.trace(M))
    )
    assert large < small / 1.5  # Hutchinson: error ∝ 1/√m


@pytest.mark.parametrize("name", DIAGONAL_ESTIMATORS)
def test_diagonal_estimators_are_unbiased_and_improve_with_budget(backend, name):
    as_operator, to_numpy = backend
    M = decaying()
    A = as_operator(M)
    estimator, alg_type = DIAGONAL_ESTIMATORS[name]
    draws = samples(estimator, alg_type, A, 12, to_numpy)
    assert_unbiased(draws, np.diag(M))

    def error(m):
        draws = samples(estimator, alg_type, A, m, to_numpy, range(30))
        return np.median(np.linalg.norm(draws - np.diag(M), axis=1))

    assert error(48) < error(12) / 1.5


def test_frobenius_norm_estimate_is_unbiased(backend):
    as_operator, to_numpy = backend
    M = decaying()
    draws = samples(estimators.frobenius_norm_squared, cc.Hutchinson, as_operator(M), 4, to_numpy)
    assert_unbiased(draws, np.sum(M**2))


def test_sketching_beats_hutchinson_on_a_low_rank_dominated_matrix(backend):
    as_operator, to_numpy = backend
    M = low_rank_dominated()
    A = as_operator(M)

    def median_error(name, m=24):
        estimator, alg_type = TRACE_ESTIMATORS[name]
        return np.median(
            np.abs(samples(estimator, alg_type, A, m, to_numpy, range(40)) - np.trace(M))
        )

    hutchinson = median_error("hutchinson")
    assert median_error("hutch++") < hutchinson / 5
    assert median_error("xtrace") < hutchinson / 5
    diagonal = {}
    for name, (estimator, alg_type) in DIAGONAL_ESTIMATORS.items():
        draws = samples(estimator, alg_type, A, 24, to_numpy, range(40))
        diagonal[name] = np.median(np.linalg.norm(draws - np.diag(M), axis=1))
    assert diagonal["xdiag"] < diagonal["hutchinson"] / 5


def test_sketching_estimators_are_exact_on_low_rank_matrices(backend):
    as_operator, to_numpy = backend
    M = low_rank(rank=5)
    A = as_operator(M)
    # Hutch++ sketches ⌊m/3⌋ = 5 ≥ rank; XTrace leaves one of ⌊m/2⌋ = 6 > rank out
    assert (
        abs(to_numpy(estimators.hutchpp_trace(A, cc.HutchPlusPlus(15, seed=3))) - np.trace(M))
        < 1e-10
    )
    assert abs(to_numpy(estimators.xtrace(A, cc.XTrace(12, seed=3))) - np.trace(M)) < 1e-10
    assert np.abs(to_numpy(estimators.xdiag(A, cc.XDiag(12, seed=3))) - np.diag(M)).max() < 1e-10


def test_slq_is_exact_for_low_degree_polynomials(backend):
    # Gauss quadrature with s nodes integrates degree < 2s exactly: SLQ of x² with s = 2 is
    # Hutchinson's ‖A z‖² on the same probes
    as_operator, to_numpy = backend
    A = as_operator(decaying())
    slq = estimators.stochastic_lanczos_quadrature(
        A, lambda x: x**2, cc.SLQ(7, num_steps=2, seed=5)
    )
    hutchinson = estimators.frobenius_norm_squared(A, cc.Hutchinson(7, seed=5))
    assert abs(to_numpy(slq) - to_numpy(hutchinson)) < 1e-12 * abs(to_numpy(hutchinson))


def test_slq_with_d_steps_is_hutchinson_on_the_exact_matrix_function(backend):
    as_operator, to_numpy = backend
    M = decaying() + 0.05 * np.eye(DIMENSION)
    A = as_operator(M)
    eigenvalues, U = np.linalg.eigh(M)
    log_m = (U * np.log(eigenvalues)) @ U.T
    Z = to_numpy(rademacher(A, 9, 11))
    expected = np.einsum("ij,ik,kj->", Z, log_m, Z) / 9
    sign, estimate = estimators.slq_slogdet(A, cc.SLQ(9, num_steps=DIMENSION, seed=11))
    assert to_numpy(sign) == 1
    assert abs(to_numpy(estimate) - expected) < 1e-9 * abs(expected)
    assert to_numpy(estimate) < 0  # log det of this matrix is negative, and stays so


def test_spectral_density_integrates_to_one_and_matches_the_eigenvalue_histogram(backend):
    as_operator, to_numpy = backend
    rng = np.random.default_rng(1)
    eigenvalues = np.r_[rng.normal(0.0, 0.05, 30), rng.normal(2.0, 0.1, 20), [5.0, 6.0]]
    A = as_operator(matrix_with_spectrum(eigenvalues))
    spectrum = estimators.spectral_density(
        A, num_runs=200, num_steps=len(eigenvalues), sigma=0.1, seed=2
    )
    step = spectrum.grid[1] - spectrum.grid[0]
    assert abs(spectrum.density.sum() * step - 1) < 1e-3
    np.testing.assert_allclose(spectrum.weights.sum(axis=1), 1, atol=1e-10)
    for low, high in [(-1, 1), (1, 3), (4, 7)]:
        inside = (spectrum.grid > low) & (spectrum.grid < high)
        mass = spectrum.density[inside].sum() * step
        assert abs(mass - np.mean((eigenvalues > low) & (eigenvalues < high))) < 0.05


def test_log_spectral_density_integrates_to_one_over_decades(backend):
    as_operator, to_numpy = backend
    A = as_operator(matrix_with_spectrum(np.logspace(-6, 2, DIMENSION)))
    spectrum = estimators.log_spectral_density(A, num_runs=50, num_steps=DIMENSION, seed=0)
    assert spectrum.log_scale
    step = spectrum.grid[1] - spectrum.grid[0]
    assert abs(spectrum.density.sum() * step - 1) < 1e-3
    assert -6.5 < spectrum.grid[np.argmax(spectrum.density > 1e-3)] < -5.5  # bottom decade seen


def test_lanczos_on_few_distinct_eigenvalues_gives_no_nan(backend):
    as_operator, to_numpy = backend
    A = as_operator(2.0 * np.eye(8))
    values, vectors = lanczos_eigenpairs(
        A, 5, "LA", tol=None, max_iters=50, seed=0, on_failure="raise"
    )
    np.testing.assert_allclose(to_numpy(values), 2.0, atol=1e-14)
    V = to_numpy(vectors)
    np.testing.assert_allclose(V.T @ V, np.eye(5), atol=1e-12)


def test_plot_draws_the_density():
    import matplotlib.pyplot as plt

    A = cola.PSD(cola.ops.Dense(torch.as_tensor(decaying())))
    spectrum = estimators.spectral_density(A, num_runs=3, num_steps=10)
    ax = cc.plotting.plot_spectral_density(spectrum, log_density=True, color="k")
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), spectrum.grid)
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "eigenvalue"
    plt.close(ax.figure)


def test_estimators_leave_the_global_rng_alone():
    A = cola.ops.Dense(torch.as_tensor(decaying()))
    before = torch.random.get_rng_state()
    estimators.xtrace(A)
    estimators.slq_slogdet(cola.PSD(A))
    assert torch.equal(before, torch.random.get_rng_state())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="square"):
        estimators.hutchinson_trace(cola.ops.Dense(torch.ones(3, 4)))
    with pytest.raises(ValueError, match="num_matvecs"):
        cc.HutchPlusPlus(num_matvecs=2)
    with pytest.raises(ValueError, match="num_matvecs"):
        cc.XTrace(num_matvecs=3)
    with pytest.raises(ValueError, match="num_probes"):
        cc.SLQ(num_probes=0)
