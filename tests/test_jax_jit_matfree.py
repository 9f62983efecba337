"""The matrix-free rules and estimators inside ``jax.jit``: same numbers as eager, exact where
the algorithm is exact, on plain CoLA operators and on curvature built from traced params."""

import warnings

import cola
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cola_curvature as cc
from cola_curvature import estimators
from cola_curvature.matfree._random import rademacher
from cola_curvature.matfree.krylov import lanczos_eigenpairs
from cola_curvature.matfree.solvers import IterativeInverse, solve
from tests import jax_reference
from tests.jax_reference import relative_error

DIMENSION = 12
#: jit and eager run the same arithmetic, up to XLA's fusion and reassociation.
JIT_RTOL = 1e-10
#: Solves stop at ``tol = 1e-12`` relative residual; a condition number ~12 bounds the error.
SOLVE_RTOL = 1e-10
SOLVERS = {
    "cg": cc.CG(tol=1e-12),
    "minres": cc.MINRES(tol=1e-12),
    "neumann": cc.Neumann(tol=1e-12, max_iters=3000),
}


pytestmark = pytest.mark.usefixtures("jax_float64")


def matrix_with_spectrum(eigenvalues, seed=0):
    """``U diag(λ) Uᵀ`` with a Haar-random orthogonal ``U``, as a float64 JAX array."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return jnp.asarray((U * np.asarray(eigenvalues, dtype=np.float64)) @ U.T)


def spd():
    return matrix_with_spectrum(np.linspace(1.0, 12.0, DIMENSION))


def right_hand_sides(k=3):
    return jnp.asarray(np.random.default_rng(1).standard_normal((DIMENSION, k)))


OPERATORS = {
    "dense": (lambda M: cola.PSD(cola.ops.Dense(M)), lambda M: M),
    "diagonal": (lambda d: cola.PSD(cola.ops.Diagonal(d)), jnp.diag),
}
VALUES = {"dense": spd, "diagonal": lambda: jnp.linspace(1.0, 12.0, DIMENSION)}


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("name", SOLVERS)
def test_solvers_under_jit_match_eager_and_a_dense_solve(kind, name):
    as_operator, as_dense = OPERATORS[kind]
    values, B = VALUES[kind](), right_hand_sides()

    def run(values, B):
        X, info = solve(as_operator(values), B, SOLVERS[name])
        return X, info["iterations"]

    eager, eager_iterations = run(values, B)
    jitted, jitted_iterations = jax.jit(run)(values, B)
    assert relative_error(jitted, eager) < JIT_RTOL
    assert int(jitted_iterations) == eager_iterations < SOLVERS[name].max_iters
    assert relative_error(jitted, jnp.linalg.solve(as_dense(values), B)) < SOLVE_RTOL


@pytest.mark.parametrize("name", SOLVERS)
def test_inverse_operator_solves_inside_jit(name):
    M, b = spd(), right_hand_sides(1)[:, 0]
    inverse = jax.jit(lambda M, b: IterativeInverse(cola.PSD(cola.ops.Dense(M)), SOLVERS[name]) @ b)
    assert relative_error(inverse(M, b), jnp.linalg.solve(M, b)) < SOLVE_RTOL


def test_stopping_short_inside_jit_warns_at_run_time_or_returns_nan():
    M, B = spd(), right_hand_sides()
    short = jax.jit(lambda M, B: solve(cola.PSD(cola.ops.Dense(M)), B, cc.CG(max_iters=2))[0])
    with pytest.warns(cc.ConvergenceWarning, match="CG stopped after 2 iterations"):
        X = jax.block_until_ready(short(M, B))
    assert bool(jnp.isfinite(X).all())
    strict = cc.CG(max_iters=2, on_failure="raise")
    failing = jax.jit(lambda M, B: solve(cola.PSD(cola.ops.Dense(M)), B, strict)[0])
    with pytest.warns(cc.ConvergenceWarning):
        assert bool(jnp.isnan(jax.block_until_ready(failing(M, B))).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged solve stays silent
        jax.block_until_ready(jax.jit(lambda M, B: solve(cola.ops.Dense(M), B, cc.CG())[0])(M, B))


def test_cg_on_an_indefinite_operator_inside_jit_returns_nan():
    indefinite = matrix_with_spectrum(np.linspace(-3.0, 8.0, DIMENSION))
    solved = jax.jit(lambda M, B: solve(cola.ops.Dense(M), B, cc.CG())[0])
    with pytest.warns(cc.ConvergenceWarning):
        X = jax.block_until_ready(solved(indefinite, right_hand_sides()))
    assert bool(jnp.isnan(X).all())


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_top_k_under_jit_matches_eigh_and_eager(which):
    M = matrix_with_spectrum(np.r_[-4.0, np.linspace(0.5, 9.0, DIMENSION - 1)])

    def top(M):
        return lanczos_eigenpairs(
            cola.ops.Dense(M), 3, which, tol=None, max_iters=DIMENSION, seed=0, on_failure="warn"
        )

    values, vectors = jax.jit(top)(M)
    eager_values, _ = top(M)
    exact = np.linalg.eigvalsh(np.asarray(M))
    order = {"LA": np.argsort(-exact), "SA": np.argsort(exact), "LM": np.argsort(-np.abs(exact))}
    assert np.abs(np.asarray(values) - exact[order[which][:3]]).max() < 1e-10
    assert np.abs(np.asarray(values - eager_values)).max() < 1e-10
    assert relative_error(M @ vectors, vectors * values[None, :]) < 1e-10


def test_lanczos_under_jit_restarts_on_breakdown_and_finds_multiplicities():
    M = matrix_with_spectrum([5.0] * 4 + [3.0] * 4 + [1.0] * 4)
    values, vectors = jax.jit(
        lambda M: lanczos_eigenpairs(
            cola.ops.Dense(M), 6, "LA", tol=None, max_iters=DIMENSION, seed=2, on_failure="warn"
        )
    )(M)
    assert np.abs(np.asarray(values) - np.r_[[5.0] * 4, [3.0] * 2]).max() < 1e-10
    assert relative_error(vectors.T @ vectors, jnp.eye(6)) < 1e-10


def test_slq_with_dimension_steps_under_jit_is_hutchinson_on_the_exact_logarithm():
    M = spd()
    slq = cc.SLQ(num_probes=4, num_steps=DIMENSION, seed=3)
    sign, log_abs = jax.jit(lambda M: estimators.slq_slogdet(cola.PSD(cola.ops.Dense(M)), slq))(M)
    eigenvalues, U = jnp.linalg.eigh(M)
    Z = rademacher(cola.ops.Dense(M), 4, 3)
    expected = jnp.einsum("ij,ik,kj->", Z, (U * jnp.log(eigenvalues)) @ U.T, Z) / 4
    eager_sign, eager_log_abs = estimators.slq_slogdet(cola.PSD(cola.ops.Dense(M)), slq)
    assert float(sign) == float(eager_sign) == 1.0
    assert abs(float(log_abs - expected)) < 1e-10 * abs(float(expected))
    assert abs(float(log_abs - eager_log_abs)) < JIT_RTOL * abs(float(expected))


def test_slq_sign_of_an_operator_not_annotated_psd_under_jit_matches_eager():
    # negative definite of odd size: every probe counts all 11 eigenvalues as negative
    M = -matrix_with_spectrum(np.linspace(1.0, 9.0, 11))
    slq = cc.SLQ(num_probes=4, num_steps=11, seed=0)
    sign, log_abs = jax.jit(lambda M: estimators.slq_slogdet(cola.ops.Dense(M), slq))(M)
    eager_sign, eager_log_abs = estimators.slq_slogdet(cola.ops.Dense(M), slq)
    assert float(sign) == float(eager_sign) == -1.0
    assert abs(float(log_abs - eager_log_abs)) < JIT_RTOL * abs(float(eager_log_abs))


ESTIMATORS = {
    "hutchinson-trace": (estimators.hutchinson_trace, cc.Hutchinson(num_matvecs=10)),
    "hutchinson-diagonal": (estimators.hutchinson_diagonal, cc.Hutchinson(num_matvecs=10)),
    "hutch++": (estimators.hutchpp_trace, cc.HutchPlusPlus(num_matvecs=9)),
    "xtrace": (estimators.xtrace, cc.XTrace(num_matvecs=10)),
    "xdiag": (estimators.xdiag, cc.XDiag(num_matvecs=10)),
    "frobenius": (estimators.frobenius_norm_squared, cc.Hutchinson(num_matvecs=10)),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimators_under_jit_match_eager(name):
    estimator, alg = ESTIMATORS[name]
    M = spd()
    estimate = jax.jit(lambda M: estimator(cola.ops.Dense(M), alg))(M)
    assert relative_error(estimate, estimator(cola.ops.Dense(M), alg)) < JIT_RTOL


def test_sketching_estimators_under_jit_are_exact_once_the_sketch_spans_the_space():
    M = spd()
    full = cc.XTrace(num_matvecs=2 * DIMENSION)
    trace = jax.jit(lambda M: estimators.xtrace(cola.ops.Dense(M), full))(M)
    diagonal = jax.jit(lambda M: estimators.xdiag(cola.ops.Dense(M), full))(M)
    assert abs(float(trace - jnp.trace(M))) < 1e-12 * float(jnp.trace(M))
    assert relative_error(diagonal, jnp.diag(M)) < 1e-12


def test_spectral_quadrature_under_jit_matches_eager():
    M, slq = spd(), cc.SLQ(num_probes=3, num_steps=8, seed=1)
    jitted = jax.jit(lambda M: estimators.SpectralQuadrature.of(cola.ops.Dense(M), slq).nodes)(M)
    eager = estimators.SpectralQuadrature.of(cola.ops.Dense(M), slq).nodes
    assert relative_error(jitted, eager) < JIT_RTOL


def test_spectral_density_inside_jit_names_the_fix():
    with pytest.raises(ValueError, match="SpectralQuadrature"):
        jax.jit(lambda M: estimators.spectral_density(cola.ops.Dense(M)).density)(spd())


# ---- curvature operators built inside the jitted function from traced parameters ----


def model_fn(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def problem(seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    params = {
        "w1": jax.random.normal(keys[0], (3, 4), dtype=jnp.float64),
        "b1": jax.random.normal(keys[1], (4,), dtype=jnp.float64),
        "w2": jax.random.normal(keys[2], (4, 2), dtype=jnp.float64),
    }
    X = jax.random.normal(keys[3], (6, 3), dtype=jnp.float64)
    Y = jax.random.normal(keys[4], (6, 2), dtype=jnp.float64)
    return params, [(X[:4], Y[:4]), (X[4:], Y[4:])]


LOSS = cc.losses.MSE(reduction="sum")
#: Entries of the parameters of :func:`problem`: 3·4 + 4 + 4·2.
D = 24


def ggn(params, data):
    return cc.GGN(model_fn, LOSS, params, data, check_deterministic=False)


def hessian(params, data):
    return cc.Hessian(model_fn, LOSS, params, data, check_deterministic=False)


def test_newton_cg_on_a_ggn_built_inside_jit_matches_a_dense_solve():
    params, data = problem()
    v = jnp.linspace(-1.0, 1.0, D)

    def newton(params, v):
        G = ggn(params, data)
        return cola.linalg.inv(G + 0.5 * cola.ops.I_like(G), alg=cc.CG(tol=1e-12)) @ v

    dense = jax_reference.dense_ggn(model_fn, "mse", "sum", params, data) + 0.5 * jnp.eye(D)
    jitted = jax.jit(newton)(params, v)
    assert relative_error(jitted, jnp.linalg.solve(dense, v)) < SOLVE_RTOL
    assert relative_error(jitted, newton(params, v)) < JIT_RTOL


def test_eig_logdet_and_trace_of_curvature_built_inside_jit():
    params, data = problem()
    dense_hessian = jax_reference.dense_hessian(model_fn, "mse", "sum", params, data)
    dense_ggn = jax_reference.dense_ggn(model_fn, "mse", "sum", params, data)

    def spectral(params):
        H, G = hessian(params, data), ggn(params, data)
        values, _ = cola.linalg.eig(H, 3, "SA", alg=cc.LanczosEig(max_iters=D))
        damped = G + 0.5 * cola.ops.I_like(G)
        _, log_abs = cola.linalg.slogdet(damped, cc.SLQ(num_probes=3, num_steps=D, seed=1))
        trace = cola.linalg.trace(G, cc.XTrace(num_matvecs=2 * D))
        return values, log_abs, trace

    values, log_abs, trace = jax.jit(spectral)(params)
    eager = spectral(params)
    assert np.abs(np.asarray(values) - np.linalg.eigvalsh(np.asarray(dense_hessian))[:3]).max() < (
        1e-9
    )
    eigenvalues, U = jnp.linalg.eigh(dense_ggn + 0.5 * jnp.eye(D))
    Z = rademacher(ggn(params, data), 3, 1)
    expected = jnp.einsum("ij,ik,kj->", Z, (U * jnp.log(eigenvalues)) @ U.T, Z) / 3
    assert abs(float(log_abs - expected)) < 1e-9 * abs(float(expected))
    assert abs(float(trace - jnp.trace(dense_ggn))) < 1e-10 * float(jnp.trace(dense_ggn))
    for jitted, eager_value in zip((values, log_abs, trace), eager, strict=True):
        assert relative_error(jitted, eager_value) < JIT_RTOL


def test_a_second_call_with_new_values_does_not_retrace():
    params, data = problem()
    traces = []

    @jax.jit
    def newton(params, v):
        traces.append(1)
        G = ggn(params, data)
        step = cola.linalg.inv(G + 0.5 * cola.ops.I_like(G), alg=cc.CG(tol=1e-12)) @ v
        return step, cola.linalg.trace(G, cc.Hutchinson(num_matvecs=4))

    first, _ = newton(params, jnp.ones(D))
    other_params, _ = problem(seed=1)
    second, _ = newton(other_params, 2 * jnp.ones(D))
    assert len(traces) == 1
    dense = jax_reference.dense_ggn(model_fn, "mse", "sum", other_params, data)
    assert relative_error(second, jnp.linalg.solve(dense + 0.5 * jnp.eye(D), 2 * jnp.ones(D))) < (
        SOLVE_RTOL
    )
    assert relative_error(first, second) > 1e-3


def test_gradient_of_a_jitted_newton_step_matches_the_dense_solve():
    # the solve differentiates implicitly: d(A⁻¹v) = −A⁻¹ dA A⁻¹v, dA from the params
    params, data = problem()
    v = jnp.linspace(-1.0, 1.0, D)

    def newton_norm(params):
        G = ggn(params, data)
        step = cola.linalg.inv(G + 0.5 * cola.ops.I_like(G), alg=cc.CG(tol=1e-12)) @ v
        return jnp.sum(step**2)

    def dense_norm(params):
        G = jax_reference.dense_ggn(model_fn, "mse", "sum", params, data)
        return jnp.sum(jnp.linalg.solve(G + 0.5 * jnp.eye(D), v) ** 2)

    gradient = jax.jit(jax.grad(newton_norm))(params)
    expected = jax.grad(dense_norm)(params)
    for name in params:
        assert relative_error(gradient[name], expected[name]) < 1e-9


def test_check_deterministic_inside_jit_names_the_fix():
    params, data = problem()
    with pytest.raises(ValueError, match="check_deterministic=False"):
        jax.jit(lambda p: cc.GGN(model_fn, LOSS, p, data) @ jnp.ones(D))(params)


def test_slq_logdet_inside_jit_is_differentiable_in_the_damping():
    # the rule of G + λI has nodes θ + λ and the weights of G: d/dλ = D mean Σ τ² / (θ + λ)
    params, data = problem()
    slq = cc.SLQ(num_probes=3, num_steps=6, seed=1)

    def log_det(damping):
        return cola.linalg.slogdet(cc.ShiftedCurvature(ggn(params, data), damping), slq)[1]

    derivative = jax.jit(jax.grad(log_det))(0.5)
    quadrature = estimators.SpectralQuadrature.of(ggn(params, data), slq)
    expected = quadrature.trace(lambda nodes: 1 / (nodes + 0.5), jnp)
    assert abs(float(derivative - expected)) < 1e-8 * abs(float(expected))
