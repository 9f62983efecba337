"""The JAX twin of the reference GPT computes the torch GPT's logits and curvature on its weights.

The torch GPT's weights are moved off their initial values (non-zero biases, norm weights
≠ 1) so that every parameter shapes the output. The JAX params are a dict keyed by torch's
parameter names, so their flat order is the sorted names; ``torch_to_jax_order`` maps
torch's flat order (``model.parameters()``) onto it, name by name.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree
from torch import nn

import cola_curvature as cc
from cola_curvature.models import GPT, GPTConfig
from cola_curvature.models.gpt_jax import gpt_model_fn, init_params, params_from_torch
from tests._tols import EXACT_RTOL
from tests.cases import F64
from tests.jax_reference import dense_ggn, relative_error

pytestmark = pytest.mark.usefixtures("jax_float64")

SIZES = {"vocab_size": 7, "context": 4, "n_layer": 2, "n_head": 2, "n_embd": 8}
LOGIT_RTOL = 1e-12
VARIANTS = {
    "layernorm-tied": {},
    "layernorm-untied": {"tie_weights": False},
    "rmsnorm-tied": {"norm": "rmsnorm"},
    "rmsnorm-untied": {"norm": "rmsnorm", "tie_weights": False},
    "no-bias-time-last": {"bias": False, "classes_first": False},
}


def torch_gpt(**options):
    """A float64 eval-mode GPT of ``SIZES`` whose every weight is off its initial value."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT(GPTConfig(**SIZES, **options)).to(F64).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model


def tokens(*shape, seed=1):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.randint(0, SIZES["vocab_size"], shape)


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_logits_match_torch(options):
    model = torch_gpt(**options)
    model_fn, params = gpt_model_fn(model.config), params_from_torch(model)
    assert list(params) == [name for name, _ in model.named_parameters()]
    assert ("lm_head.weight" in params) is not model.config.tie_weights
    for idx in (tokens(3, 4), tokens(2, 3)):  # full context and a shorter sequence
        expected = model(idx).detach().numpy()
        logits = model_fn(params, jnp.asarray(idx.numpy()))
        assert logits.dtype == jnp.float64
        assert relative_error(logits, expected) < LOGIT_RTOL


def torch_to_jax_order(named_parameters):
    """Return ``perm`` with ``jax_flat = torch_flat[perm]``: torch's order, then sorted names."""
    indices, offset = {}, 0
    for name, p in named_parameters:
        indices[name] = np.arange(offset, offset + p.numel()).reshape(tuple(p.shape))
        offset += p.numel()
    return np.asarray(ravel_pytree(indices)[0])


def operator_arguments(model, names=None):
    """Torch and JAX ``(model, loss, params, data)`` and the flat order map.

    ``names`` selects the parameters (default: all); in JAX the others are held fixed by
    closing over them.
    """
    X, Y = tokens(6, 4), tokens(6, 4, seed=2)
    data = list(zip(X.split(3), Y.split(3), strict=True))
    named = [(name, p) for name, p in model.named_parameters() if names is None or name in names]
    torch_args = (model, nn.CrossEntropyLoss(), [p for _, p in named], data)
    jax_data = [(jnp.asarray(x.numpy()), jnp.asarray(y.numpy())) for x, y in data]
    model_fn, params = gpt_model_fn(model.config), params_from_torch(model)
    if names is not None:
        gpt_fn, fixed = model_fn, params
        params = {name: fixed[name] for name in names}

        def model_fn(selected, idx):
            return gpt_fn(fixed | selected, idx)

    jax_args = (model_fn, cc.losses.CrossEntropy(), params)
    perm = torch_to_jax_order(named)
    assert sorted(perm) == list(range(len(perm)))
    assert not np.array_equal(perm, np.arange(len(perm)))  # the two flat orders differ
    return torch_args, (*jax_args, jax_data), perm


def vectors(perm):
    """Three random columns in torch's flat order, and the same columns in JAX's."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        V = torch.randn(len(perm), 3, dtype=F64)
    return V, jnp.asarray(V.numpy()[perm])


@pytest.fixture(scope="module")
def tied(jax_float64):
    """Operator arguments of the tied LayerNorm GPT (``wte.weight`` is one leaf, used twice)."""
    return operator_arguments(torch_gpt())


#: Determinism is checked elsewhere; here it would only compile more programs.
FAST = {"check_deterministic": False}
LINEAR = re.compile(r"(c_attn|c_proj|c_fc|lm_head)\.")


@pytest.mark.parametrize("operator_type", [cc.GGN, cc.Hessian], ids=["ggn", "hessian"])
def test_operators_match_torch_on_the_same_weights(tied, operator_type):
    torch_args, jax_args, perm = tied
    V, V_jax = vectors(perm)
    expected = (operator_type(*torch_args, **FAST) @ V).numpy()[perm]
    assert relative_error(operator_type(*jax_args, **FAST) @ V_jax, expected) < EXACT_RTOL


def test_kfac_matches_torch_on_the_untied_gpt():
    # the dense layers' parameters (per block c_attn, attn.c_proj, c_fc, mlp.c_proj, and the
    # lm-head); the dense block KFAC would add for the others is the GGN's, tested above
    model = torch_gpt(tie_weights=False)
    names = [name for name, _ in model.named_parameters() if LINEAR.search(name)]
    torch_args, jax_args, perm = operator_arguments(model, names)
    V, V_jax = vectors(perm)
    torch_kfac, jax_kfac = cc.KFAC(*torch_args, **FAST), cc.KFAC(*jax_args, **FAST)
    assert len(jax_kfac.layers) == len(torch_kfac.layers) == 4 * SIZES["n_layer"] + 1
    assert relative_error(jax_kfac @ V_jax, (torch_kfac @ V).numpy()[perm]) < EXACT_RTOL


def test_kfac_matches_torch_on_the_tied_gpt(tied):
    torch_args, jax_args, perm = tied
    V, V_jax = vectors(perm)
    options = {"uncovered": "dense", **FAST}
    jax_product = cc.KFAC(*jax_args, **options) @ V_jax
    expected = (cc.KFAC(*torch_args, **options) @ V).numpy()[perm]
    assert relative_error(jax_product, expected) < EXACT_RTOL


def test_jax_ggn_matches_the_dense_jacobian_reference(tied):
    _, (model_fn, loss, params, data), perm = tied
    _, V = vectors(perm)
    expected = dense_ggn(model_fn, "ce", "mean", params, data) @ V
    assert relative_error(cc.GGN(model_fn, loss, params, data, **FAST) @ V, expected) < EXACT_RTOL


def test_params_from_torch_copies_and_leaves_the_model_alone():
    model = torch_gpt()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = params_from_torch(model)
    with torch.no_grad():
        model.wte.weight.zero_()
    assert np.abs(np.asarray(params["wte.weight"])).min() > 0
    for name, p in model.named_parameters():
        assert name == "wte.weight" or torch.equal(p, before[name]), name
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_init_params_has_torch_names_and_shapes(options):
    config = GPTConfig(**SIZES, **options)
    params = init_params(config, jax.random.key(0), jnp.float64)
    with torch.random.fork_rng():
        torch_shapes = {name: tuple(p.shape) for name, p in GPT(config).named_parameters()}
    assert {name: a.shape for name, a in params.items()} == torch_shapes
    for name, a in params.items():
        assert a.dtype == jnp.float64
        if name.endswith("bias"):
            assert not a.any(), name
        elif a.ndim == 1:
            np.testing.assert_array_equal(a, 1.0, err_msg=name)
    assert gpt_model_fn(config)(params, jnp.zeros((2, 3), int)).shape[0] == 2


def test_errors_name_the_fix():
    with pytest.raises(NotImplementedError, match="attention='sdpa'"):
        gpt_model_fn(GPTConfig(**SIZES, attention="mha"))
    with pytest.raises(TypeError, match="cola_curvature.models.GPT"):
        params_from_torch(nn.Linear(2, 2))
    model = torch_gpt()
    with pytest.raises(ValueError, match="exceeds the context"):
        gpt_model_fn(model.config)(params_from_torch(model), jnp.zeros((1, 5), int))
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            params_from_torch(model)
    finally:
        jax.config.update("jax_enable_x64", True)
