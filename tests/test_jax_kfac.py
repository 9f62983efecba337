"""KFAC and EKFAC on JAX models: exact cases, the torch backend on the same weights, errors."""

import functools
import itertools

import cola
import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree
from torch import nn

import cola_curvature as cc
from tests import jax_reference
from tests._tols import EXACT_RTOL
from tests.jax_reference import relative_error

DAMPING = 1e-2


pytestmark = pytest.mark.usefixtures("jax_float64")


def dense(operator):
    """``operator @ I``, traced as one program (eager JAX compiles every small op separately)."""
    return np.asarray(jax.jit(lambda: operator @ jnp.eye(operator.shape[0]))())


#: The dense references, each compiled as one program per model and shapes.
dense_ggn = jax.jit(jax_reference.dense_ggn, static_argnums=(0, 1, 2))
dense_empirical_fisher = jax.jit(jax_reference.dense_empirical_fisher, static_argnums=(0, 1, 2))
#: The determinism check is tested with the other operators; here it would only add compiles.
FAST = {"check_deterministic": False}


def normal(key, *shape):
    return jax.random.normal(jax.random.key(key), shape, dtype=jnp.float64)


def uneven_batches(X, y):
    return [(X[:3], y[:3]), (X[3:5], y[3:5]), (X[5:], y[5:])]


def layer_block_mask(params, groups):
    """1 where both flat coordinates belong to leaves of the same group (layer), else 0."""
    labels = {}
    for g, keys in enumerate(groups):
        for key in keys:
            labels[key] = g
    tree = {k: jnp.full(v.shape, labels[k]) for k, v in params.items()}
    flat = np.asarray(ravel_pytree(tree)[0])
    return (flat[:, None] == flat[None, :]).astype(np.float64)


# ---- layers written in the styles users write them -------------------------------------


def torch_linear(W, b, x):
    """``x Wᵀ + b`` with a torch-layout ``(out, in)`` weight."""
    return x @ W.T + b


def flax_linear(W, b, x):
    """``x W + b`` with a flax-layout ``(in, out)`` kernel, through ``jnp.dot``."""
    return jnp.dot(x, W) + b


def einsum_linear(W, b, x):
    """``(out, in)`` weight through ``jnp.einsum`` (a nested jaxpr); bias added outside."""
    return jnp.einsum("...i,oi->...o", x, W) + b


jitted_linear = jax.jit(torch_linear)


def conv(W, b, x, layout, **options):
    """A 2-D convolution in ``NCHW``/``OIHW`` (torch) or ``NHWC``/``HWIO`` (flax) layout."""
    numbers = ("NCHW", "OIHW", "NCHW") if layout == "torch" else ("NHWC", "HWIO", "NHWC")
    options = {"window_strides": (1, 1), "padding": "VALID", **options}
    out = jax.lax.conv_general_dilated(x, W, dimension_numbers=numbers, **options)
    return out + (b[:, None, None] if layout == "torch" else b)


def kernel(key, layout, out, inp, size):
    shape = (out, inp, size, size) if layout == "torch" else (size, size, inp, out)
    return 0.5 * normal(key, *shape)


def spatial_mean(h, layout):
    return h.mean((2, 3) if layout == "torch" else (1, 2))


# ---- exact settings (as tests/test_kfac.py) ----------------------------------------------
# Each problem is built once (``functools.cache``): the tests of a model share its
# ``model_fn`` and loss objects, on which the library keys its compiled programs.

MSE_LOSSES = {reduction: cc.losses.MSE(reduction) for reduction in ("sum", "mean")}


@functools.cache
def deep_linear():
    """Deep linear network + MSE, one layer per style (torch, flax, einsum, jit, W as lhs)."""
    params = {
        "a_w": normal(0, 4, 3),
        "a_b": normal(1, 4),
        "b_w": normal(2, 4, 4),
        "b_b": normal(3, 4),
        "c_w": normal(4, 4, 4),
        "c_b": normal(5, 4),
        "d_w": normal(6, 3, 4),
        "d_b": normal(7, 3),
        "e_w": normal(8, 2, 3),
        "f_w": normal(9, 2, 2),
    }

    def model_fn(p, x):
        h = torch_linear(p["a_w"], p["a_b"], x)
        h = flax_linear(p["b_w"], p["b_b"], h)
        h = einsum_linear(p["c_w"], p["c_b"], h)
        h = jitted_linear(p["d_w"], p["d_b"], h)
        return (p["f_w"] @ (p["e_w"] @ h.T)).T  # weights as lhs, examples on the last axis

    X, y = normal(10, 8, 3), normal(11, 8, 2)
    groups = [("a_w", "a_b"), ("b_w", "b_b"), ("c_w", "c_b"), ("d_w", "d_b"), ("e_w",), ("f_w",)]
    return model_fn, params, uneven_batches(X, y), groups


@functools.cache
def sequence_linear():
    """Position-wise deep linear network over a sequence + MSE per position: expand exact."""
    params = {
        "a_w": normal(0, 3, 4),
        "a_b": normal(1, 4),
        "b_w": normal(2, 2, 4),
        "b_b": normal(3, 2),
    }

    def model_fn(p, x):
        return torch_linear(p["b_w"], p["b_b"], flax_linear(p["a_w"], p["a_b"], x))

    X, y = normal(10, 8, 5, 3), normal(11, 8, 5, 2)
    return model_fn, params, uneven_batches(X, y), [("a_w", "a_b"), ("b_w", "b_b")]


@functools.cache
def sequence_mean_linear():
    """Shared linear layer, mean over the sequence, linear head + MSE: reduce exact."""
    params = {
        "a_w": normal(0, 4, 3),
        "a_b": normal(1, 4),
        "b_w": normal(2, 4, 2),
        "b_b": normal(3, 2),
    }

    def model_fn(p, x):
        return flax_linear(p["b_w"], p["b_b"], torch_linear(p["a_w"], p["a_b"], x).mean(1))

    X, y = normal(10, 8, 5, 3), normal(11, 8, 2)
    return model_fn, params, uneven_batches(X, y), [("a_w", "a_b"), ("b_w", "b_b")]


def pointwise_conv(layout):
    """1×1 convolutions + MSE per pixel: expand exact over pixels."""

    @functools.cache
    def build():
        params = {
            "a_w": kernel(0, layout, 3, 2, 1),
            "a_b": normal(1, 3),
            "b_w": kernel(2, layout, 2, 3, 1),
            "b_b": normal(3, 2),
        }

        def model_fn(p, x):
            return conv(p["b_w"], p["b_b"], conv(p["a_w"], p["a_b"], x, layout), layout)

        shape = (8, 2, 3, 3) if layout == "torch" else (8, 3, 3, 2)
        X, y = normal(10, *shape), normal(11, *shape)
        return model_fn, params, uneven_batches(X, y), [("a_w", "a_b"), ("b_w", "b_b")]

    return build


def conv_pool_linear(layout):
    """3×3 conv (padding, stride 2, dilation), spatial mean, linear head + MSE: reduce exact."""

    @functools.cache
    def build():
        params = {
            "a_w": kernel(0, layout, 3, 2, 3),
            "a_b": normal(1, 3),
            "b_w": normal(2, 2, 3),
            "b_b": normal(3, 2),
        }
        options = {"window_strides": (2, 1), "padding": ((1, 1), (2, 0)), "rhs_dilation": (1, 2)}

        def model_fn(p, x):
            h = spatial_mean(conv(p["a_w"], p["a_b"], x, layout, **options), layout)
            return torch_linear(p["b_w"], p["b_b"], h)

        shape = (8, 2, 5, 6) if layout == "torch" else (8, 5, 6, 2)
        X, y = normal(10, *shape), normal(11, 8, 2)
        return model_fn, params, uneven_batches(X, y), [("a_w", "a_b"), ("b_w", "b_b")]

    return build


EXACT_SETTINGS = {
    "deep-linear-expand": (deep_linear, "expand"),
    "deep-linear-reduce": (deep_linear, "reduce"),
    "sequence-expand": (sequence_linear, "expand"),
    "sequence-mean-reduce": (sequence_mean_linear, "reduce"),
    "pointwise-conv-nchw-expand": (pointwise_conv("torch"), "expand"),
    "pointwise-conv-nhwc-expand": (pointwise_conv("flax"), "expand"),
    "conv-pool-nchw-reduce": (conv_pool_linear("torch"), "reduce"),
    "conv-pool-nhwc-reduce": (conv_pool_linear("flax"), "reduce"),
}


@pytest.mark.parametrize(
    ("setting", "reduction"), list(itertools.product(EXACT_SETTINGS, ["sum", "mean"]))
)
def test_type2_kfac_equals_ggn_blocks_where_exact(setting, reduction):
    build, approx = EXACT_SETTINGS[setting]
    model_fn, params, data, groups = build()
    loss = MSE_LOSSES[reduction]
    ggn = dense_ggn(model_fn, "mse", reduction, params, data)
    expected = ggn * layer_block_mask(params, groups)
    kfac = cc.KFAC(model_fn, loss, params, data, kfac_approx=approx, **FAST)
    assert len(kfac.layers) == len(groups)
    assert relative_error(dense(kfac), expected) < EXACT_RTOL
    ekfac = cc.EKFAC(model_fn, loss, params, data, kfac_approx=approx, **FAST)
    assert relative_error(dense(ekfac), expected) < EXACT_RTOL


def single_example(loss_name):
    """A tanh MLP on one example (flax layout, then torch layout)."""
    params = {
        "a_w": normal(0, 3, 4),
        "a_b": normal(1, 4),
        "b_w": normal(2, 3, 4),
        "b_b": normal(3, 3),
    }

    def model_fn(p, x):
        return torch_linear(p["b_w"], p["b_b"], jnp.tanh(flax_linear(p["a_w"], p["a_b"], x)))

    X = normal(10, 1, 3)
    targets = {
        "ce": jnp.array([2]),
        "mse": normal(11, 1, 3),
        "bce": jax.random.uniform(jax.random.key(12), (1, 3), dtype=jnp.float64),
    }
    return model_fn, params, [(X, targets[loss_name])], [("a_w", "a_b"), ("b_w", "b_b")]


LOSSES = {"ce": cc.losses.CrossEntropy, "mse": cc.losses.MSE, "bce": cc.losses.BCEWithLogits}


@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_single_example_kfac_is_exact_for_every_fisher_type(loss_name):
    """One example: G ⊗ A is the curvature block for type-2, empirical and (same seed) mc."""
    model_fn, params, data, groups = single_example(loss_name)
    loss = LOSSES[loss_name]("mean")
    mask = layer_block_mask(params, groups)
    args = (model_fn, "mse" if loss_name == "mse" else loss_name, "mean", params, data)
    references = {
        "type-2": dense_ggn(*args),
        "empirical": dense_empirical_fisher(*args),
        "mc": dense(cc.FisherMC(model_fn, loss, params, data, mc_samples=3, seed=7, **FAST)),
    }
    for fisher_type, reference in references.items():
        for operator in (cc.KFAC, cc.EKFAC):
            built = operator(
                model_fn, loss, params, data, fisher_type=fisher_type, mc_samples=3, seed=7, **FAST
            )
            assert relative_error(dense(built), reference * mask) < EXACT_RTOL, fisher_type


def test_ekfac_eigenvalues_are_the_diagonal_of_the_exact_block_in_the_kfac_eigenbasis():
    """EKFAC's defining property on a non-linear model where KFAC itself is not exact."""
    model_fn, params, _, groups = single_example("ce")
    X, y = normal(20, 9, 3), jax.random.randint(jax.random.key(21), (9,), 0, 3)
    # batches of one shape: one compiled program each (uneven batches are tested above)
    data = [(X[start : start + 3], y[start : start + 3]) for start in (0, 3, 6)]
    loss = cc.losses.CrossEntropy()
    mask = layer_block_mask(params, groups)
    args = (model_fn, "ce", "mean", params, data)
    for fisher_type, reference in [
        ("type-2", dense_ggn(*args)),
        ("empirical", dense_empirical_fisher(*args)),
    ]:
        kfac = cc.KFAC(model_fn, loss, params, data, fisher_type=fisher_type, **FAST)
        ekfac = cc.EKFAC(model_fn, loss, params, data, fisher_type=fisher_type, **FAST)
        permutation, start = np.asarray(ekfac.permutation), 0
        for block in ekfac.blocks:
            positions = permutation[start : start + block.shape[0]]
            basis = np.kron(np.asarray(block.q_out), np.asarray(block.q_in))
            projected = np.diag(basis.T @ reference[np.ix_(positions, positions)] @ basis)
            assert relative_error(np.asarray(block.eigenvalues).reshape(-1), projected) < EXACT_RTOL
            start += block.shape[0]
        ekfac_error = relative_error(dense(ekfac), reference * mask)
        kfac_error = relative_error(dense(kfac), reference * mask)
        assert ekfac_error <= kfac_error
        assert kfac_error > 1e-3


def test_forward_only_has_identity_output_factor_and_mean_input_factor():
    model_fn, params, data, _ = deep_linear()
    kfac = cc.KFAC(model_fn, MSE_LOSSES["mean"], params, data, fisher_type="forward-only")
    X = jnp.concatenate([x for x, _ in data])
    augmented = jnp.concatenate([X, jnp.ones((X.shape[0], 1))], axis=1)
    first = kfac.blocks[0]
    assert np.array_equal(np.asarray(first.output_factor), np.eye(4))
    assert relative_error(first.input_factor, augmented.T @ augmented / X.shape[0]) < EXACT_RTOL


# ---- the same networks in torch and JAX --------------------------------------------------


@functools.cache
def torch_networks():
    """(name, torch model, JAX model_fn, torch → JAX parameter map, data) with CE loss."""
    torch.manual_seed(9)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(torch.float64)
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)
    ).to(torch.float64)

    def mlp_fn(p, x):
        return (
            jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"]) @ p["l1"]["kernel"] + p["l1"]["bias"]
        )

    def cnn_fn(p, x):  # NHWC inside, NCHW flatten order as torch's Flatten
        h = conv(p["conv"]["kernel"], p["conv"]["bias"], x, "flax", padding=((1, 1), (1, 1)))
        h = jax.lax.reduce_window(
            jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
        )
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)
        return h @ p["dense"]["kernel"] + p["dense"]["bias"]

    def linear_map(module):  # (out, in) → flax (in, out)
        return {"kernel": lambda w: w.T, "bias": lambda b: b}, module

    def conv_map(module):  # OIHW → HWIO
        return {"kernel": lambda w: np.transpose(w, (2, 3, 1, 0)), "bias": lambda b: b}, module

    # 24 examples: more than the 19 input features of the conv under "reduce", so that no
    # factor has a repeated (zero) eigenvalue whose eigenbasis, and so EKFAC, is arbitrary
    X_mlp, X_cnn = (
        torch.randn(24, 3, dtype=torch.float64),
        torch.randn(24, 2, 4, 4, dtype=torch.float64),
    )
    y = torch.randint(0, 3, (24,))
    return {
        "mlp": (mlp, mlp_fn, {"l0": linear_map(mlp[0]), "l1": linear_map(mlp[2])}, X_mlp, y, None),
        "cnn": (
            cnn,
            cnn_fn,
            {"conv": conv_map(cnn[0]), "dense": linear_map(cnn[4])},
            X_cnn,
            y,
            lambda x: np.transpose(x, (0, 2, 3, 1)),
        ),
    }


#: Shared by the tests on ``torch_networks()``, so that they share compiled programs.
CE_LOSSES = {reduction: cc.losses.CrossEntropy(reduction) for reduction in ("sum", "mean")}


def halves(X, y):
    """Two batches of one shape (one compiled program; uneven batches are tested above)."""
    return [(X[:12], y[:12]), (X[12:], y[12:])]


def to_jax(model, layout, X, y, input_map):
    """Return JAX params and data and ``perm`` with ``jax_flat = torch_flat[perm]``."""
    offsets, offset = {}, 0
    for p in model.parameters():
        offsets[id(p)] = offset
        offset += p.numel()
    params, indices = {}, {}
    for key, (maps, module) in layout.items():
        params[key], indices[key] = {}, {}
        for name, transform in maps.items():
            tensor = getattr(module, {"kernel": "weight", "bias": "bias"}[name])
            index = np.arange(tensor.numel()).reshape(tuple(tensor.shape)) + offsets[id(tensor)]
            params[key][name] = jnp.asarray(transform(tensor.detach().numpy()))
            indices[key][name] = jnp.asarray(transform(index))
    perm = np.asarray(ravel_pytree(indices)[0])
    input_map = input_map or (lambda x: x)
    data = [(jnp.asarray(input_map(x.numpy())), jnp.asarray(t.numpy())) for x, t in halves(X, y)]
    return params, data, perm


@pytest.mark.parametrize(
    ("network", "approx"), [("mlp", "expand"), ("cnn", "expand"), ("cnn", "reduce")]
)
def test_jax_and_torch_give_the_same_kfac_and_ekfac(network, approx):
    """Every fisher_type but mc (whose samples come from different generators)."""
    model, model_fn, layout, X, y, input_map = torch_networks()[network]
    params, data, perm = to_jax(model, layout, X, y, input_map)
    torch_data = halves(X, y)
    for fisher_type, reduction in [
        ("type-2", "mean"),
        ("empirical", "sum"),
        ("forward-only", "mean"),
    ]:
        operators = [cc.KFAC] + ([cc.EKFAC] if fisher_type != "forward-only" else [])
        loss = CE_LOSSES[reduction]
        for operator in operators:
            options = {"fisher_type": fisher_type, "kfac_approx": approx, **FAST}
            ours = operator(model_fn, loss, params, data, **options)
            theirs = operator(
                model,
                nn.CrossEntropyLoss(reduction=reduction),
                list(model.parameters()),
                torch_data,
                **options,
            )
            expected = theirs.to_dense().numpy()[np.ix_(perm, perm)]
            assert relative_error(dense(ours), expected) < EXACT_RTOL, (operator, fisher_type)


@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_jax_and_torch_kfac_give_the_same_logdet_and_solve(network):
    model, model_fn, layout, X, y, input_map = torch_networks()[network]
    params, data, perm = to_jax(model, layout, X, y, input_map)
    loss = CE_LOSSES["mean"]
    for operator in (cc.KFAC, cc.EKFAC):
        ours = operator(model_fn, loss, params, data, **FAST)
        theirs = operator(
            model, nn.CrossEntropyLoss(), list(model.parameters()), halves(X, y), **FAST
        )
        v = torch.randn(
            theirs.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
        damped_ours = ours + DAMPING * cola.ops.I_like(ours)
        damped_theirs = theirs + DAMPING * cola.ops.I_like(theirs)
        logdet_ours = float(cola.linalg.logdet(damped_ours))
        logdet_theirs = float(cola.linalg.logdet(damped_theirs))
        assert abs(logdet_ours - logdet_theirs) < EXACT_RTOL * abs(logdet_theirs)
        solved_ours = cola.linalg.inv(damped_ours) @ jnp.asarray(v.numpy()[perm])
        solved_theirs = (cola.linalg.inv(damped_theirs) @ v).numpy()[perm]
        assert relative_error(solved_ours, solved_theirs) < EXACT_RTOL


# ---- coverage and errors -----------------------------------------------------------------


def scaled_linear():
    params = {"w": normal(0, 3, 2), "b": normal(1, 2), "scale": jnp.array([1.5, -0.5])}
    X, y = normal(2, 6, 3), jax.random.randint(jax.random.key(3), (6,), 0, 2)
    return params, [(X, y)]


def test_uncovered_leaves_raise_or_get_an_exact_dense_block():
    params, data = scaled_linear()

    def model_fn(p, x):
        return flax_linear(p["w"], p["b"], x) * p["scale"]

    loss = cc.losses.CrossEntropy()
    with pytest.raises(ValueError, match=r"params\[1\] \(\"\['scale'\]\".*uncovered='dense'"):
        cc.KFAC(model_fn, loss, params, data)
    ggn = dense_ggn(model_fn, "ce", "mean", params, data)
    # flat order: b (2), scale (2), w (6); the layer is (b, w)
    mask = layer_block_mask(params, [("w", "b"), ("scale",)])
    for operator in (cc.KFAC, cc.EKFAC):
        built = dense(operator(model_fn, loss, params, data, uncovered="dense"))
        assert relative_error(built[2:4, 2:4], ggn[2:4, 2:4]) < EXACT_RTOL
        assert np.count_nonzero(built * (1 - mask)) == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            # also used outside the layer (as a tied lm-head is): left uncovered, named
            lambda p, x: flax_linear(p["w"], p["b"], x) + p["w"].sum(),
            r"\(\"\['w'\]\".*uncovered=",
        ),
        (lambda p, x: flax_linear(jnp.tanh(p["w"]), p["b"], x), r"params\[1\] \(\"\['w'\]\""),
    ],
    ids=["layer-and-other-op", "nonlinear-op"],
)
def test_leaves_used_outside_one_layer_are_named(body, message):
    params = {"w": normal(0, 2, 2), "b": normal(1, 2)}
    X = normal(2, 4, 2)
    with pytest.raises(ValueError, match=message):
        cc.KFAC(body, cc.losses.MSE(), params, [(X, X)])


def test_unsupported_convolutions_are_named():
    params = {"k": normal(0, 2, 1, 1, 1)}
    X = normal(1, 3, 2, 4, 4)

    def grouped(p, x):
        out = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "VALID", feature_group_count=2)
        return out.reshape(x.shape[0], -1)

    def transposed(p, x):
        out = jax.lax.conv_general_dilated(x, p["k"], (1, 1), ((0, 0), (0, 0)), lhs_dilation=(2, 2))
        return out.reshape(x.shape[0], -1)

    targets = jnp.zeros((3, 32))
    with pytest.raises(ValueError, match=r"\['k'\].*feature_group_count=2"):
        cc.KFAC(grouped, cc.losses.MSE(), params, [(X, targets)])
    with pytest.raises(ValueError, match=r"\['k'\].*lhs_dilation=\(2, 2\)"):
        cc.KFAC(transposed, cc.losses.MSE(), params, [(X[:, :1], jnp.zeros((3, 98)))])


class LinenConvNet(linen.Module):
    """flax linen: NHWC/HWIO conv (stride 2, padding 1), spatial mean, Dense head."""

    @linen.compact
    def __call__(self, x):
        x = linen.Conv(3, (3, 3), strides=2, padding=1, param_dtype=jnp.float64)(x)
        return linen.Dense(2, param_dtype=jnp.float64)(x.mean((1, 2)))


def test_flax_linen_modules_are_exact_where_kfac_is():
    """A linen module straight into KFAC (adapter): reduce is exact for conv-pool-linear."""
    module = LinenConvNet()
    X, y = normal(0, 8, 5, 5, 2), normal(1, 8, 2)
    variables = module.init(jax.random.key(2), X)
    data = uneven_batches(X, y)
    kfac = cc.KFAC(module, cc.losses.MSE(), variables, data, kfac_approx="reduce", **FAST)
    assert [layer.name for layer in kfac.layers] == [
        "['Conv_0']['kernel']",
        "['Dense_0']['kernel']",
    ]
    params = variables["params"]
    ggn = dense_ggn(lambda p, x: module.apply({"params": p}, x), "mse", "mean", params, data)
    labels = {
        key: jax.tree_util.tree_map(lambda leaf, k=i: jnp.full(leaf.shape, k), layer)
        for i, (key, layer) in enumerate(params.items())
    }
    flat = np.asarray(ravel_pytree(labels)[0])
    mask = (flat[:, None] == flat[None, :]).astype(np.float64)
    assert relative_error(dense(kfac), ggn * mask) < EXACT_RTOL


class PositionWise(eqx.Module):
    """An equinox module applied to every position of a per-example sequence ``(T, in)``."""

    module: eqx.Module

    def __call__(self, x):
        return jax.vmap(self.module)(x)


@pytest.mark.parametrize(
    ("shape", "approx"),
    [((3,), "reduce"), ((5, 3), "expand")],
    ids=["mlp-reduce", "sequence-expand"],
)
def test_equinox_modules_are_exact_where_kfac_is(shape, approx):
    """A vmapped deep linear eqx MLP + MSE: every bias attached, KFAC = plain = GGN blocks.

    ``jax.vmap`` of ``W @ x + b`` gives ``transpose(W @ Xᵀ) + b`` (over a sequence, a
    transpose of ``(out, N, T)``): the bias lies along the transposed output's features.
    """
    mlp = eqx.nn.MLP(3, 2, 4, 2, activation=lambda h: h, key=jax.random.key(0), dtype=jnp.float64)
    module = mlp if len(shape) == 1 else PositionWise(mlp)
    model_fn, params = cc.backends.jax.from_equinox(module)
    leaves = jax.tree_util.tree_leaves(params)  # (weight, bias) per layer, in flat order
    pairs = list(zip(leaves[::2], leaves[1::2], strict=True))

    def plain_fn(p, x):
        for W, b in p:
            x = torch_linear(W, b, x)
        return x

    X, y = normal(10, 8, *shape), normal(11, 8, *shape[:-1], 2)
    # two batches of one shape: one compiled program each (uneven batches are tested above)
    data, loss = [(X[:4], y[:4]), (X[4:], y[4:])], MSE_LOSSES["mean"]
    ggn = dense_ggn(plain_fn, "mse", "mean", pairs, data)
    labels = np.concatenate([np.full(leaf.size, i // 2) for i, leaf in enumerate(leaves)])
    expected = ggn * (labels[:, None] == labels[None, :])
    for operator in (cc.KFAC, cc.EKFAC):
        built = operator(module, loss, None, data, kfac_approx=approx, **FAST)
        assert [layer.bias_index for layer in built.layers] == [1, 3, 5]
        plain = operator(plain_fn, loss, pairs, data, kfac_approx=approx, **FAST)
        built_dense = dense(built)
        assert relative_error(built_dense, dense(plain)) < EXACT_RTOL
        assert relative_error(built_dense, expected) < EXACT_RTOL


@pytest.mark.parametrize(
    "body",
    [
        lambda p, x: (p["w"] @ x.T).T + p["b"][:, None],
        lambda p, x: p["w"] @ x.T + p["b"],
        lambda p, x: x @ p["w"].T + p["b"][:, None],
    ],
    ids=["transposed", "features-first", "features-last"],
)
def test_a_bias_along_the_example_axis_is_not_attached(body):
    """With as many examples as output features, a bias along the examples is uncovered."""
    params = {"w": normal(0, 4, 3), "b": normal(1, 4)}
    X = normal(2, 4, 3)
    with pytest.raises(ValueError, match=r"params\[0\] \(\"\['b'\]\".*uncovered='dense'"):
        cc.KFAC(body, cc.losses.MSE(), params, [(X, body(params, X))])
    kfac = cc.KFAC(body, cc.losses.MSE(), params, [(X, body(params, X))], uncovered="dense")
    assert [layer.bias_index for layer in kfac.layers] == [None]


def test_laplace_with_jax_kfac_matches_torch():
    model, model_fn, layout, X, y, input_map = torch_networks()["mlp"]
    params, data, _ = to_jax(model, layout, X, y, input_map)
    for curvature in ("kfac", "ekfac"):
        ours = cc.Laplace(model_fn, CE_LOSSES["sum"], params, data, curvature=curvature)
        theirs = cc.Laplace(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            list(model.parameters()),
            halves(X, y),
            curvature=curvature,
        )
        expected = float(theirs.log_marginal_likelihood())
        assert abs(float(ours.log_marginal_likelihood()) - expected) < EXACT_RTOL * abs(expected)
