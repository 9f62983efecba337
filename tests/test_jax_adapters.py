"""flax linen, flax nnx and equinox modules through the adapters.

Each module gives the matrices that a plain ``model_fn``, written here without the
framework, gives on the same parameter pytree (dense ``jax.hessian`` / ``jax.jacfwd``
references, float64). The linen and nnx models have a batch norm with non-trivial running
statistics, which must be used and held fixed.
"""

import subprocess
import sys
from pathlib import Path

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.flatten_util import ravel_pytree

import cola_curvature as cc
from cola_curvature.backends.jax import adapters, from_equinox, from_flax_linen, from_flax_nnx
from tests import jax_reference
from tests._tols import EXACT_RTOL
from tests.jax_cases import JAX_LOSSES
from tests.jax_reference import relative_error

ROOT = Path(__file__).resolve().parent.parent
F64 = jnp.float64
#: flax's BatchNorm default epsilon.
BATCH_NORM_EPS = 1e-5
OPERATORS = {
    "hessian": (cc.Hessian, jax_reference.dense_hessian),
    "ggn": (cc.GGN, jax_reference.dense_ggn),
    "empirical-fisher": (cc.EmpiricalFisher, jax_reference.dense_empirical_fisher),
}


pytestmark = pytest.mark.usefixtures("jax_float64")


def dense(operator):
    return operator @ jnp.eye(operator.shape[0])


def randomize(tree, seed):
    """The same pytree with independent N(0, 0.7²) entries (nothing zero or one)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        0.7 * jax.random.normal(k, leaf.shape, F64) for k, leaf in zip(keys, leaves, strict=True)
    ]
    return treedef.unflatten(new)


def make_data(loss, split=(15,), seed=0):
    """15 examples in batches of sizes ``split``; inputs ``(N, 4)``, three outputs."""
    kx, ky = jax.random.split(jax.random.key(seed))
    X = jax.random.normal(kx, (15, 4), F64)
    if loss == "ce":
        Y = jax.random.randint(ky, (15,), 0, 3)
    elif loss == "bce":
        Y = jax.random.uniform(ky, (15, 3), F64)
    else:
        Y = jax.random.normal(ky, (15, 3), F64)
    ends = np.cumsum(split)
    return [
        (X[end - size : end], Y[end - size : end]) for size, end in zip(split, ends, strict=True)
    ]


def check_against_plain(module, params_arg, plain_fn, plain_params, loss, reduction, split=(15,)):
    """Every operator on the module equals the dense reference of ``plain_fn``."""
    data = make_data(loss, split)
    loss_func = JAX_LOSSES[loss](reduction=reduction)
    for name, (operator_type, reference) in OPERATORS.items():
        actual = dense(operator_type(module, loss_func, params_arg, data))
        expected = reference(plain_fn, loss, reduction, plain_params, data)
        assert relative_error(actual, expected) < EXACT_RTOL, name


def check_param_format(operator, params):
    """A pytree shaped like the adapter's params goes in and comes out in that shape."""
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(5), flat.shape, F64)
    shaped = operator @ unravel(v)
    assert jax.tree_util.tree_structure(shaped) == jax.tree_util.tree_structure(params)
    assert relative_error(ravel_pytree(shaped)[0], operator @ v) < EXACT_RTOL


# ----------------------------------------------------------------------------- flax linen


class LinenMLP(linen.Module):
    """Dense(5) – BatchNorm (running averages) – tanh – Dense(3)."""

    @linen.compact
    def __call__(self, x):
        h = linen.Dense(5, param_dtype=F64)(x)
        h = linen.BatchNorm(use_running_average=True, param_dtype=F64)(h)
        return linen.Dense(3, param_dtype=F64)(jnp.tanh(h))


def batch_norm(h, scale, bias, mean, var):
    return (h - mean) / jnp.sqrt(var + BATCH_NORM_EPS) * scale + bias


def linen_problem():
    module = LinenMLP()
    variables = module.init(jax.random.key(0), jnp.ones((1, 4), F64))
    stats = {"mean": 0.5 * jnp.arange(5.0), "var": 0.5 + jnp.arange(5.0) / 4}
    variables = {"params": randomize(variables["params"], 1), "batch_stats": {"BatchNorm_0": stats}}

    def plain_fn(p, x):
        h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        h = batch_norm(h, p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"], **stats)
        return jnp.tanh(h) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    return module, variables, plain_fn


def test_linen_module_gives_the_matrices_of_the_plain_model_fn():
    module, variables, plain_fn = linen_problem()
    check_against_plain(module, variables, plain_fn, variables["params"], "ce", "mean", (9, 6))


def test_linen_takes_and_returns_its_params_pytree_and_keeps_the_variables():
    module, variables, _ = linen_problem()
    before = jax.tree_util.tree_map(np.array, variables)
    ggn = cc.GGN(module, cc.losses.MSE(), variables, make_data("mse"))
    check_param_format(ggn, variables["params"])
    after = jax.tree_util.tree_map(np.array, variables)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, before, after))


# ------------------------------------------------------------------------------- flax nnx


class NnxMLP(nnx.Module):
    """Linear(4, 5) – BatchNorm – tanh – Linear(5, 3)."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 5, rngs=rngs, param_dtype=F64)
        self.bn = nnx.BatchNorm(5, rngs=rngs, param_dtype=F64)
        self.l2 = nnx.Linear(5, 3, rngs=rngs, param_dtype=F64)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


def nnx_problem():
    module = NnxMLP(nnx.Rngs(0))
    nnx.update(module, randomize(nnx.state(module, nnx.Param), 2))
    stats = {"mean": 0.5 * jnp.arange(5.0), "var": 0.5 + jnp.arange(5.0) / 4}
    module.bn.mean[...] = stats["mean"].astype(module.bn.mean.dtype)  # exact in float32
    module.bn.var[...] = stats["var"].astype(module.bn.var.dtype)
    module.eval()
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))

    def plain_fn(p, x):
        h = x @ p["l1"]["kernel"] + p["l1"]["bias"]
        h = batch_norm(h, p["bn"]["scale"], p["bn"]["bias"], **stats)
        return jnp.tanh(h) @ p["l2"]["kernel"] + p["l2"]["bias"]

    return module, params, plain_fn


def test_nnx_module_gives_the_matrices_of_the_plain_model_fn():
    module, params, plain_fn = nnx_problem()
    # the plain dict flattens in the order of the module's nnx.State
    state = nnx.state(module, nnx.Param)
    assert np.array_equal(ravel_pytree(params)[0], ravel_pytree(state)[0])
    check_against_plain(module, None, plain_fn, params, "mse", "sum")


def test_nnx_filter_selects_a_subset_and_the_module_is_left_as_it_was():
    module, _, _ = nnx_problem()
    before = jax.tree_util.tree_map(np.array, nnx.to_pure_dict(nnx.state(module)))
    data = make_data("ce")
    loss = cc.losses.CrossEntropy()
    full = dense(cc.GGN(module, loss, nnx.Param, data))
    head = cc.GGN(module, loss, nnx.All(nnx.Param, nnx.PathContains("l2")), data)
    assert head.shape == (18, 18)
    # "l2" sorts last among the module's parameters: its block is the last 18 entries
    assert relative_error(dense(head), full[-18:, -18:]) < EXACT_RTOL
    check_param_format(head, nnx.state(module, nnx.All(nnx.Param, nnx.PathContains("l2"))))
    after = jax.tree_util.tree_map(np.array, nnx.to_pure_dict(nnx.state(module)))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, before, after))


# -------------------------------------------------------------------------------- equinox


def equinox_problem():
    module = eqx.nn.MLP(4, 3, 5, 1, activation=jnp.tanh, key=jax.random.key(3), dtype=F64)
    params, static = eqx.partition(module, eqx.is_inexact_array)
    module = eqx.combine(randomize(params, 4), static)

    def plain_fn(p, x):
        first, second = p.layers
        return jnp.tanh(x @ first.weight.T + first.bias) @ second.weight.T + second.bias

    return module, plain_fn


def test_equinox_module_is_vmapped_and_gives_the_matrices_of_the_plain_model_fn():
    module, plain_fn = equinox_problem()
    params = eqx.filter(module, eqx.is_inexact_array)
    check_against_plain(module, None, plain_fn, params, "bce", "mean")
    check_param_format(cc.GGN(module, cc.losses.MSE(), None, make_data("mse")), params)


class BatchedMLP(eqx.Module):
    """An equinox module that takes whole batches itself."""

    mlp: eqx.nn.MLP

    def __call__(self, x):
        return jax.vmap(self.mlp)(x)


def test_equinox_filter_spec_and_batched_modules():
    module, _ = equinox_problem()
    data, loss = make_data("ce"), cc.losses.CrossEntropy(reduction="sum")
    full = dense(cc.GGN(module, loss, eqx.is_inexact_array, data))
    spec = jax.tree_util.tree_map(lambda _: False, module)
    spec = eqx.tree_at(lambda m: (m.layers[1].weight, m.layers[1].bias), spec, (True, True))
    head = cc.GGN(module, loss, spec, data)
    assert head.shape == (18, 18)
    # eqx flattens each layer weight first, then bias: the head is the last 18 entries
    assert relative_error(dense(head), full[-18:, -18:]) < EXACT_RTOL
    model_fn, params = from_equinox(BatchedMLP(module), batched=True)
    batched = dense(cc.GGN(model_fn, loss, params, data))
    assert relative_error(batched, full) < EXACT_RTOL


@pytest.mark.parametrize("operator_type", [cc.KFAC, cc.EKFAC])
def test_kronecker_factored_curvature_of_flax_modules_matches_the_plain_model_fn(operator_type):
    data, loss = make_data("ce", (9, 6)), cc.losses.CrossEntropy()
    module, variables, plain_fn = linen_problem()
    nnx_module, nnx_params, nnx_plain_fn = nnx_problem()
    pairs = [
        ((module, loss, variables, data), (plain_fn, loss, variables["params"], data)),
        ((nnx_module, loss, None, data), (nnx_plain_fn, loss, nnx_params, data)),
    ]
    for args, plain_args in pairs:
        # the batch norm's scale and bias are no dense layer's: an exact dense block
        actual = dense(operator_type(*args, uncovered="dense"))
        expected = dense(operator_type(*plain_args, uncovered="dense"))
        assert relative_error(actual, expected) < EXACT_RTOL


# --------------------------------------------------------------------------- errors, imports


def test_adapter_errors_name_the_fix():
    data = make_data("mse")
    loss = cc.losses.MSE()
    module, variables, _ = linen_problem()
    with pytest.raises(TypeError, match="variables module.init returned.*'params' collection"):
        cc.GGN(module, loss, variables["params"], data)
    with pytest.raises(ValueError, match="model_fn\\(params, X\\) failed"):
        cc.GGN(module, loss, {**variables, "params": variables["params"]["Dense_0"]}, data)
    with pytest.raises(TypeError, match="No curvature backend.*cola_curvature.losses"):
        cc.GGN(module, torch.nn.MSELoss(), variables, data)
    nnx_module, _, _ = nnx_problem()
    with pytest.raises(TypeError, match="nnx filter such as nnx.Param.*State"):
        cc.GGN(nnx_module, loss, nnx.state(nnx_module, nnx.Param), data)
    with pytest.raises(ValueError, match="selects none of the module's state"):
        cc.GGN(nnx_module, loss, nnx.PathContains("no_such_layer"), data)
    eqx_module, _ = equinox_problem()
    with pytest.raises(TypeError, match="filter spec as for eqx.partition"):
        cc.GGN(eqx_module, loss, eqx_module, data)


@pytest.mark.parametrize(
    ("adapter", "missing", "extra"),
    [
        (from_flax_linen, "flax.linen", "flax"),
        (from_flax_nnx, "flax.nnx", "flax"),
        (from_equinox, "equinox", "equinox"),
    ],
)
def test_missing_package_raises_an_import_error_naming_the_extra(
    monkeypatch, adapter, missing, extra
):
    monkeypatch.setitem(sys.modules, missing, None)  # ``import missing`` now fails
    with pytest.raises(ImportError, match=rf"{adapter.__name__} needs .*cola-curvature\[{extra}\]"):
        adapter(object(), None)


def test_stand_in_classes_match_only_their_framework():
    module, _, _ = linen_problem()
    assert isinstance(module, adapters.LinenModule)
    assert not isinstance(module, (adapters.NnxModule, adapters.EquinoxModule))
    assert issubclass(eqx.nn.MLP, adapters.EquinoxModule)
    assert not issubclass(adapters.EquinoxModule, adapters.LinenModule)
    assert not isinstance(lambda p, x: x, adapters.EquinoxModule)


LATE_IMPORT = """
import sys
import jax, jax.numpy as jnp
import cola_curvature as cc
assert not {"flax", "equinox"} & set(sys.modules), "cola_curvature imported flax or equinox"
X, y = jnp.ones((3, 4)), jnp.zeros((3, 2))
params = {"w": jnp.ones((4, 2))}
cc.GGN(lambda p, x: x @ p["w"], cc.losses.MSE(), params, [(X, y)])  # dispatch resolved
import equinox as eqx
module = eqx.nn.Linear(4, 2, key=jax.random.key(0))
print(cc.GGN(module, cc.losses.MSE(), None, [(X, y)]).shape)
"""


def test_cola_curvature_imports_without_the_frameworks_and_matches_them_later():
    result = subprocess.run(
        [sys.executable, "-c", LATE_IMPORT], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(10, 10)"
