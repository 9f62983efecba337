"""One architecture with the same weights in torch and in JAX gives the same curvature matrices.

The JAX models are written in JAX's own layouts (flax's conventions), not torch's: dense
kernels ``(in, out)``, convolutions on NHWC inputs with HWIO kernels (so the flattened
features come in ``(h, w, c)`` order), nested parameter dicts. Each model's ``convert``
maps torch's weights to that layout; applied to the torch flat *indices* instead of the
weights, the same function gives the permutation between the two flat orders. Each model
is defined twice in JAX: as a plain ``model_fn`` and as a flax linen module whose
variables are the same pytree.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree

import cola_curvature as cc
from tests._tols import EXACT_RTOL
from tests.cases import Case
from tests.jax_cases import JAX_LOSSES
from tests.jax_reference import relative_error

F64 = jnp.float64
OPERATORS = [cc.Hessian, cc.GGN, cc.EmpiricalFisher]


pytestmark = pytest.mark.usefixtures("jax_float64")


def dense_layer(p, x):
    return x @ p["kernel"] + p["bias"]


def max_pool(h):
    """2×2 max pooling with stride 2 on NHWC."""
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def mlp_fn(p, x):
    return dense_layer(p["out"], jnp.tanh(dense_layer(p["hidden"], x)))


def cnn_fn(p, x):
    h = jax.lax.conv_general_dilated(
        x, p["conv"]["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = max_pool(jax.nn.relu(h + p["conv"]["bias"]))
    return dense_layer(p["out"], h.reshape(h.shape[0], -1))


def sequence_fn(p, x, channels_first):
    out = dense_layer(p["head"], jnp.tanh(dense_layer(p["shared"], x)))
    return jnp.swapaxes(out, 1, 2) if channels_first else out


def dense(t, name):
    """``nn.Linear`` weight ``(out, in)`` and bias → a kernel ``(in, out)`` and bias."""
    return {"kernel": t[f"{name}.weight"].T, "bias": t[f"{name}.bias"]}


def convert_mlp(t):
    return {"hidden": dense(t, "0"), "out": dense(t, "2")}


def convert_cnn(t):
    # conv OIHW → HWIO; the head's inputs go from torch's (c, h, w) flattening to (h, w, c)
    head = t["4.weight"].reshape(3, 3, 2, 2).transpose(2, 3, 1, 0).reshape(12, 3)
    return {
        "conv": {"kernel": t["0.weight"].transpose(2, 3, 1, 0), "bias": t["0.bias"]},
        "out": {"kernel": head, "bias": t["4.bias"]},
    }


def convert_sequence(t):
    return {"shared": dense(t, "shared"), "head": dense(t, "head")}


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.Dense(5, name="hidden", param_dtype=F64)(x)
        return nn.Dense(3, name="out", param_dtype=F64)(jnp.tanh(hidden))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 3), padding="VALID", name="conv", param_dtype=F64)(x)
        h = nn.max_pool(nn.relu(h), (2, 2), strides=(2, 2))
        return nn.Dense(3, name="out", param_dtype=F64)(h.reshape(h.shape[0], -1))


class LinenSequence(nn.Module):
    channels_first: bool

    @nn.compact
    def __call__(self, x):
        hidden = jnp.tanh(nn.Dense(4, name="shared", param_dtype=F64)(x))
        out = nn.Dense(2, name="head", param_dtype=F64)(hidden)
        return jnp.swapaxes(out, 1, 2) if self.channels_first else out


def nhwc(x):
    return x.transpose(0, 2, 3, 1)


#: model → (convert weights, model_fn(loss), linen module(loss), convert inputs)
MODELS = {
    "mlp": (convert_mlp, lambda loss: mlp_fn, lambda loss: LinenMLP(), lambda x: x),
    "cnn": (convert_cnn, lambda loss: cnn_fn, lambda loss: LinenCNN(), nhwc),
    "sequence": (
        convert_sequence,
        lambda loss: partial(sequence_fn, channels_first=loss == "ce"),
        lambda loss: LinenSequence(channels_first=loss == "ce"),
        lambda x: x,
    ),
}
#: Every model with two losses, every loss on two models, both reductions, one batch (the
#: batch aggregation is checked per backend); the linen definitions take the third loss.
CASES = [
    Case(*names.split("-"), "one")
    for names in ["mlp-mse-sum", "mlp-bce-mean", "cnn-ce-mean", "cnn-mse-sum"]
    + ["sequence-ce-sum", "sequence-bce-mean"]
]
LINEN_CASES = [
    Case(*names.split("-"), "one") for names in ["mlp-ce-mean", "cnn-bce-sum", "sequence-mse-mean"]
]


def jax_twin(case, definition):
    """The JAX model, loss, params and data of ``case``, and the map from torch's flat order."""
    model, loss_func, params, data = case.build()
    convert, model_fn, linen_module, convert_inputs = MODELS[case.model]
    weights = {name: p.detach().numpy() for name, p in model.named_parameters()}
    jax_params = jax.tree_util.tree_map(jnp.asarray, convert(weights))
    indices, offset = {}, 0
    for name, w in weights.items():
        indices[name] = np.arange(offset, offset + w.size).reshape(w.shape)
        offset += w.size
    perm = np.asarray(ravel_pytree(convert(indices))[0])
    jax_data = [(jnp.asarray(convert_inputs(x.numpy())), jnp.asarray(y.numpy())) for x, y in data]
    loss = JAX_LOSSES[case.loss](reduction=case.reduction)
    if definition == "flax-linen":
        variables = {"params": jax_params}
        return (linen_module(case.loss), loss, variables, jax_data), perm
    return (model_fn(case.loss), loss, jax_params, jax_data), perm


def dense_matrix(operator):
    """``operator @ I``, traced as one program (eager JAX compiles every small op separately).

    The operators are built with ``check_deterministic=False``: that check is tested with
    the operators themselves; here it would only add two products per operator.
    """
    return np.asarray(jax.jit(lambda: operator @ jnp.eye(operator.shape[0]))())


def check_same_matrices(case, definition):
    torch_args = case.build()
    jax_args, perm = jax_twin(case, definition)
    assert sorted(perm) == list(range(len(perm)))
    for operator_type in OPERATORS:
        torch_operator = operator_type(*torch_args, check_deterministic=False)
        D = torch_operator.shape[0]
        torch_dense = (torch_operator @ torch.eye(D, dtype=torch.float64)).numpy()
        jax_dense = dense_matrix(operator_type(*jax_args, check_deterministic=False))
        expected = torch_dense[np.ix_(perm, perm)]
        assert relative_error(jax_dense, expected) < EXACT_RTOL, operator_type.__name__


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_torch_and_jax_model_fn_give_the_same_matrices(case):
    check_same_matrices(case, "model_fn")


@pytest.mark.parametrize("case", LINEN_CASES, ids=[case.id for case in LINEN_CASES])
def test_torch_and_flax_linen_give_the_same_matrices(case):
    check_same_matrices(case, "flax-linen")


def test_the_layout_map_moves_every_weight():
    # the permutation is not the identity for any model: the test above compares layouts
    for case in (Case(model, "mse", "sum", "one") for model in MODELS):
        _, perm = jax_twin(case, "model_fn")
        assert not np.array_equal(perm, np.arange(len(perm))), case.model
