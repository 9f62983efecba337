"""The matrix-free operators on JAX models: dense references, formats, compilation, errors."""

import itertools

import cola
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from jax.flatten_util import ravel_pytree

import cola_curvature as cc
from cola_curvature.kfac_statistics import chunking
from cola_curvature.matfree._random import rademacher
from tests import jax_reference
from tests import reference as torch_reference
from tests._tols import EXACT_RTOL, MC_RTOL
from tests.cases import Case
from tests.jax_cases import build_jax_problem, mlp_fn, torch_to_jax_order
from tests.jax_reference import relative_error

OPERATORS = {
    "hessian": (cc.Hessian, jax_reference.dense_hessian, torch_reference.dense_hessian),
    "ggn": (cc.GGN, jax_reference.dense_ggn, torch_reference.dense_ggn),
    "empirical-fisher": (
        cc.EmpiricalFisher,
        jax_reference.dense_empirical_fisher,
        torch_reference.dense_empirical_fisher,
    ),
}
#: The (loss, reduction) pairs the MLP sees on uneven batches (the CNN and the sequence model
#: with weight sharing see the other pairs on uneven batches).
UNEVEN = {("mse", "sum"), ("ce", "mean"), ("bce", "mean")}


def _keep(case):
    """Every model with every loss and reduction once, half of them on uneven batches."""
    on_uneven = ((case.loss, case.reduction) in UNEVEN) == (case.model == "mlp")
    return (case.batching == "uneven") == on_uneven


CASES = [
    case
    for case in itertools.starmap(
        Case,
        itertools.product(
            ["mlp", "cnn", "sequence"], ["mse", "ce", "bce"], ["sum", "mean"], ["one", "uneven"]
        ),
    )
    if _keep(case)
]


pytestmark = pytest.mark.usefixtures("jax_float64")


def dense(operator):
    return operator @ jnp.eye(operator.shape[0])


@pytest.mark.parametrize("operator_name", OPERATORS)
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_dense_form_matches_jax_and_torch_references(case, operator_name):
    operator_type, jax_dense, torch_dense = OPERATORS[operator_name]
    problem = build_jax_problem(case)
    operator = operator_type(*problem.args, check_deterministic=False)
    actual = dense(operator)
    expected = jax_dense(problem.model_fn, case.loss, case.reduction, problem.params, problem.data)
    assert relative_error(actual, expected) < EXACT_RTOL
    model, loss_func, params, data = problem.torch_problem
    perm = torch_to_jax_order(model)
    from_torch = torch_dense(model, loss_func, params, data).numpy()[np.ix_(perm, perm)]
    assert relative_error(actual, from_torch) < EXACT_RTOL


@pytest.mark.parametrize("operator_type", [cc.Hessian, cc.GGN, cc.EmpiricalFisher, cc.FisherMC])
def test_vector_matrix_and_pytree_products_agree(operator_type):
    problem = build_jax_problem(Case("sequence", "ce", "mean", "one"))
    operator = operator_type(*problem.args)
    V = jax.random.normal(jax.random.key(1), (operator.shape[0], 3))
    matrix_product = operator @ V
    assert matrix_product.shape == V.shape
    for i in range(3):
        assert relative_error(operator @ V[:, i], matrix_product[:, i]) < EXACT_RTOL
    _, unravel = ravel_pytree(problem.params)
    shaped = operator @ unravel(V[:, 0])
    assert jax.tree_util.tree_structure(shaped) == jax.tree_util.tree_structure(problem.params)
    assert relative_error(ravel_pytree(shaped)[0], matrix_product[:, 0]) < EXACT_RTOL
    scipy_operator = operator.to_scipy()
    assert isinstance(scipy_operator, scipy.sparse.linalg.LinearOperator)
    assert relative_error(scipy_operator @ np.asarray(V), matrix_product) < EXACT_RTOL


DIAGONAL_CASES = [Case("cnn", "ce", "sum", "uneven"), Case("sequence", "bce", "mean", "uneven")]


@pytest.mark.parametrize("case", DIAGONAL_CASES, ids=[case.id for case in DIAGONAL_CASES])
def test_diagonal_from_per_example_gradients_is_exact(case):
    problem = build_jax_problem(case)
    references = {
        "type-2": jax_reference.dense_ggn,
        "empirical": jax_reference.dense_empirical_fisher,
    }
    for fisher_type, reference in references.items():
        diagonal = cc.DiagonalCurvature(*problem.args, fisher_type=fisher_type)
        dense_reference = reference(problem.model_fn, case.loss, case.reduction, *problem.args[2:])
        assert relative_error(cola.linalg.diag(diagonal), jnp.diag(dense_reference)) < EXACT_RTOL
    mc = cc.DiagonalCurvature(*problem.args, fisher_type="mc", mc_samples=3, seed=4)
    fisher = cc.FisherMC(*problem.args, mc_samples=3, seed=4)  # the same draws
    assert relative_error(cola.linalg.diag(mc), jnp.diag(dense(fisher))) < EXACT_RTOL


@pytest.mark.parametrize("split", ["columns", "examples"])
def test_diagonal_held_a_chunk_at_a_time_is_exact(split, monkeypatch):
    """Over the memory budget, ``lax.scan`` over padded chunks gives the same diagonal."""
    case = Case("sequence", "ce", "sum", "uneven")
    problem = build_jax_problem(case)
    dimension = ravel_pytree(problem.params)[0].size
    num_examples = len(problem.data[0][0])
    budget = 4 * num_examples * dimension * 8 if split == "columns" else 2 * dimension * 8
    monkeypatch.setattr(chunking, "PER_EXAMPLE_GRADIENT_BYTES", budget)
    expected_chunks = (4, num_examples) if split == "columns" else (1, 2)
    assert chunking.gradient_chunks(6, num_examples, dimension, 8) == expected_chunks
    diagonal = cc.DiagonalCurvature(*problem.args)  # type-2 CE: 6 = C · T columns, N = 7, 5, 3
    expected = jax_reference.dense_ggn(
        problem.model_fn, case.loss, case.reduction, *problem.args[2:]
    )
    assert relative_error(cola.linalg.diag(diagonal), jnp.diag(expected)) < EXACT_RTOL


def tiny_classifier():
    return build_jax_problem(Case("mlp", "ce", "mean", "one"), seed=3)


def test_mc_fisher_converges_to_the_ggn_and_is_fixed_per_seed():
    problem = tiny_classifier()
    ggn = dense(cc.GGN(*problem.args))
    few_operator = cc.FisherMC(*problem.args, mc_samples=1, seed=0)
    few = dense(few_operator)
    many = dense(cc.FisherMC(*problem.args, mc_samples=3000, seed=0))
    assert relative_error(many, ggn) < MC_RTOL
    assert relative_error(many, ggn) < relative_error(few, ggn) / 5
    again = dense(few_operator)
    other = dense(cc.FisherMC(*problem.args, mc_samples=1, seed=1))
    assert np.array_equal(few, again)
    assert not np.allclose(few, other)
    assert np.linalg.eigvalsh(np.asarray(few)).min() > -1e-12


@pytest.mark.parametrize("operator_type", [cc.Hessian, cc.GGN, cc.EmpiricalFisher, cc.FisherMC])
def test_products_compile_once_per_batch_shape(operator_type):
    problem = build_jax_problem(Case("mlp", "mse", "sum", "uneven"))
    traces = []

    def counting_fn(params, x):
        traces.append(x.shape[0])
        return mlp_fn(params, x)

    operator = operator_type(counting_fn, problem.loss, problem.params, problem.data)
    V = jax.random.normal(jax.random.key(0), (operator.shape[0], 3))
    traces.clear()
    first = operator @ V
    # one trace per batch shape for all 3 columns: they share one linearisation (or gradient)
    assert sorted(traces) == [3, 5, 7]
    second = operator @ (2 * V)
    again = operator @ V[:, 1]  # (D,) is a (D, 1) product: compiled at construction
    assert sorted(traces) == [3, 5, 7]
    assert relative_error(second, 2 * first) < EXACT_RTOL
    assert relative_error(again, first[:, 1]) < EXACT_RTOL
    # an operator rebuilt on new parameter values (a training step) reuses the programs
    moved = jax.tree_util.tree_map(lambda p: 1.5 * p, problem.params)
    rebuilt = operator_type(counting_fn, problem.loss, moved, problem.data)
    rebuilt @ V
    assert sorted(traces) == [3, 5, 7]


def test_bad_input_names_the_fix():
    problem = tiny_classifier()
    model_fn, loss, params, data = problem.args
    with pytest.raises(ValueError, match="params is the pytree model_fn expects"):
        cc.GGN(model_fn, loss, {"0.weight": params["0.weight"]}, data)
    with pytest.raises(ValueError, match="params is the pytree model_fn expects"):
        cc.GGN(model_fn, loss, {**params, "2.bias": jnp.zeros(7)}, data)
    with pytest.raises(TypeError, match=r"leaf \['0.bias'\] has dtype int.*astype"):
        cc.GGN(model_fn, loss, {**params, "0.bias": jnp.zeros(5, dtype=int)}, data)
    with pytest.raises(TypeError, match=r"leaf \['0.bias'\] is a torch.Tensor.*jnp.asarray"):
        cc.GGN(model_fn, loss, {**params, "0.bias": torch.zeros(5)}, data)
    with pytest.raises(ValueError, match="one dtype"):
        cc.GGN(model_fn, loss, {**params, "0.bias": jnp.zeros(5, dtype=jnp.float32)}, data)
    with pytest.raises(TypeError, match="No curvature backend.*cola_curvature.losses"):
        cc.GGN(model_fn, torch.nn.CrossEntropyLoss(), params, data)
    with pytest.raises(ValueError, match="labels"):
        cc.GGN(model_fn, loss, params, [(x, y[:, None]) for x, y in data])
    ggn = cc.GGN(model_fn, loss, params, data)
    D = ggn.shape[0]
    with pytest.raises(ValueError, match=rf"entries but v has shape \({D + 1},\).*D={D}"):
        ggn @ jnp.zeros(D + 1)
    with pytest.raises(ValueError, match="dtype float64.*astype"):
        ggn @ jnp.zeros(D, dtype=jnp.float32)
    with pytest.raises(TypeError, match=r"jax.Array, got torch.Tensor.*jnp.asarray"):
        ggn @ torch.zeros(D, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"jax.Array, got numpy.ndarray"):
        ggn @ np.zeros(D)
    with pytest.raises(ValueError, match="parameter-shaped input must be a pytree"):
        ggn @ {"0.weight": params["0.weight"]}


def test_arrays_of_the_other_library_are_refused_with_the_conversion():
    problem = tiny_classifier()
    model_fn, loss, params, data = problem.args
    model, loss_func, torch_params, torch_data = problem.torch_problem
    (X, y), (torch_X, torch_y) = data[0], torch_data[0]
    to_jax = r"JAX model needs JAX or NumPy arrays.*jnp.asarray\(np.asarray\(x\)\)"
    with pytest.raises(TypeError, match=rf"data holds a torch.Tensor, but a {to_jax}"):
        cc.GGN(model_fn, loss, params, [(torch_X, y)])
    with pytest.raises(TypeError, match=rf"data holds a torch.Tensor, but a {to_jax}"):
        cc.GGN(model_fn, loss, params, [({"x": X, "mask": torch_X}, y)], batch_size_fn=len)
    with pytest.raises(TypeError, match=rf"data holds a torch.Tensor, but a {to_jax}"):
        cc.GGN(model_fn, loss, params, [(X, torch_y)])
    to_torch = r"torch model needs tensors.*torch.as_tensor\(np.asarray\(x\)\)"
    with pytest.raises(TypeError, match=rf"data holds a jax.*ArrayImpl, but a {to_torch}"):
        cc.GGN(model, loss_func, torch_params, [(X, torch_y)])
    with pytest.raises(TypeError, match=rf"data holds a jax.*ArrayImpl, but a {to_torch}"):
        cc.GGN(model, loss_func, torch_params, [(torch_X, y)])
    torch_ggn = cc.GGN(model, loss_func, torch_params, torch_data)
    jax_ggn = cc.GGN(*problem.args)
    D = jax_ggn.shape[0]
    from_jax = r"expected a torch.Tensor, got jax.*ArrayImpl.*torch.as_tensor\(np.asarray\(v\)\)"
    with pytest.raises(TypeError, match=from_jax):
        torch_ggn @ jnp.ones(D)
    with pytest.raises(TypeError, match=from_jax):
        torch_ggn @ [jnp.ones(p.shape) for p in torch_params]
    with pytest.raises(TypeError, match=r"expected a jax.Array, got torch.Tensor.*jnp.asarray"):
        jax_ggn @ torch.ones(D, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype float64.*astype"):
        jax_ggn @ jnp.ones(D, dtype=jnp.int32)
    with pytest.raises(ValueError, match=rf"entries but v has shape \({D}, 2, 1\).*D={D}"):
        jax_ggn @ jnp.ones((D, 2, 1))


def test_products_run_under_jit_and_vmap_and_take_dict_inputs():
    problem = tiny_classifier()
    ggn = cc.GGN(*problem.args)
    V = jax.random.normal(jax.random.key(2), (ggn.shape[0], 2))
    expected = ggn @ V
    assert relative_error(jax.jit(lambda v: ggn @ v)(V), expected) < EXACT_RTOL
    assert relative_error(jax.vmap(lambda v: ggn @ v)(V.T).T, expected) < EXACT_RTOL
    dict_data = [({"x": x}, y) for x, y in problem.data]
    dict_ggn = cc.GGN(
        lambda params, inputs: mlp_fn(params, inputs["x"]),
        problem.loss,
        problem.params,
        dict_data,
        batch_size_fn=lambda inputs: inputs["x"].shape[0],
    )
    assert relative_error(dict_ggn @ V, expected) < EXACT_RTOL


def test_matrix_free_rules_run_on_jax_operators():
    problem = build_jax_problem(Case("mlp", "mse", "sum", "uneven"))
    ggn, hessian = cc.GGN(*problem.args), cc.Hessian(*problem.args)
    dense_ggn = jax_reference.dense_ggn(
        problem.model_fn, "mse", "sum", problem.params, problem.data
    )
    dense_hessian = jax_reference.dense_hessian(
        problem.model_fn, "mse", "sum", problem.params, problem.data
    )
    eye = jnp.eye(ggn.shape[0])
    b = jax.random.normal(jax.random.key(0), (ggn.shape[0], 2))
    damped = ggn + 0.5 * cola.ops.I_like(ggn)
    assert isinstance(damped, cc.ShiftedCurvature)
    expected = jnp.linalg.solve(dense_ggn + 0.5 * eye, b)
    assert relative_error(cola.linalg.inv(damped) @ b, expected) < 1e-8
    expected = jnp.linalg.solve(dense_hessian + 0.05 * eye, b)
    minres = cola.linalg.inv(hessian + 0.05 * cola.ops.I_like(hessian))
    assert isinstance(minres.alg, cc.MINRES)
    assert relative_error(minres @ b, expected) < 1e-8
    values, _ = cola.linalg.eig(hessian, 3, "SA")
    assert jnp.abs(values - jnp.linalg.eigvalsh(dense_hessian)[:3]).max() < 1e-8
    D = ggn.shape[0]
    exact_trace = cola.linalg.trace(ggn, cc.XTrace(num_matvecs=2 * D))
    assert abs(exact_trace - jnp.trace(dense_ggn)) < 1e-9 * D
    # with D steps the quadrature is exact: Hutchinson on log(G + λI) with the same probes
    sign, log_abs = cola.linalg.slogdet(damped, cc.SLQ(num_probes=3, num_steps=D, seed=1))
    eigenvalues, U = jnp.linalg.eigh(dense_ggn + 0.5 * eye)
    Z = rademacher(damped, 3, 1)
    expected = jnp.einsum("ij,ik,kj->", Z, (U * jnp.log(eigenvalues)) @ U.T, Z) / 3
    assert sign == 1 and abs(log_abs - expected) < 1e-8 * abs(expected)


def test_laplace_on_jax_gives_the_numbers_of_torch():
    problem = build_jax_problem(Case("mlp", "mse", "sum", "uneven"))
    model, loss_func, params, data = problem.torch_problem
    options = dict(curvature="full", prior_precision=2.0, sigma_noise=0.5)
    torch_laplace = cc.Laplace(model, loss_func, params, data, **options)
    jax_laplace = cc.Laplace(*problem.args, **options)
    torch_mean, torch_cov = torch_laplace.predictive(data[0][0][:3])
    jax_mean, jax_cov = jax_laplace.predictive(problem.data[0][0][:3])
    assert np.abs(np.asarray(jax_mean) - torch_mean.numpy()).max() < 1e-12
    scale = np.abs(torch_cov.numpy()).max()
    assert np.abs(np.asarray(jax_cov) - torch_cov.numpy()).max() < 1e-10 * scale
    evidence = float(jax_laplace.log_marginal_likelihood())
    assert abs(evidence - float(torch_laplace.log_marginal_likelihood())) < 1e-10 * abs(evidence)
    jax_laplace.optimize_prior_precision(steps=5)
    torch_laplace.optimize_prior_precision(steps=5)
    assert float(jax_laplace.log_marginal_likelihood()) > evidence
    assert abs(float(jax_laplace.prior_precision) - float(torch_laplace.prior_precision)) < 1e-8
    assert abs(float(jax_laplace.sigma_noise) - float(torch_laplace.sigma_noise)) < 1e-8


def test_matrix_free_laplace_on_jax_uses_an_exact_quadrature_per_probe():
    problem = build_jax_problem(Case("mlp", "mse", "sum", "uneven"))
    D = sum(p.numel() for p in problem.torch_problem[2])
    slq = cc.SLQ(num_probes=3, num_steps=D, seed=0)  # D steps: each probe's rule is exact
    laplace = cc.Laplace(*problem.args, curvature="ggn", prior_precision=2.0, slq=slq)
    P = np.asarray(laplace.posterior_precision() @ jnp.eye(D))
    eigenvalues, U = np.linalg.eigh(P)
    Z = np.asarray(rademacher(laplace.posterior_precision(), 3, 0))
    expected = np.einsum("ij,ik,kj->", Z, (U * np.log(eigenvalues)) @ U.T, Z) / 3
    assert abs(float(laplace.log_det_posterior_precision()) - expected) < 1e-8 * abs(expected)
