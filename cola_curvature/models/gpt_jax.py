"""The JAX twin of the torch :class:`~cola_curvature.models.GPT`: same weights, same maths.

:func:`gpt_model_fn` turns a config into a pure ``model_fn(params, idx) -> logits`` written
in ``jax.numpy``; ``params`` is a flat dict keyed by torch's parameter names
(``"wte.weight"``, ``"blocks.0.attn.c_attn.weight"``, …) with torch's layouts (``Linear``
weights ``(out, in)``), so :func:`params_from_torch` only copies arrays. With
``tie_weights`` there is no ``"lm_head.weight"`` key: the lm-head reads the one leaf
``"wte.weight"``, as ``GPT.named_parameters()`` lists the tied weight once. The config is
any object with :class:`~cola_curvature.models.GPTConfig`'s attributes, and this module
imports torch only inside :func:`params_from_torch`. Flat vectors follow
``ravel_pytree(params)``: the names sorted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, jax.Array]

#: ``nn.LayerNorm``'s default ``eps``.
LAYERNORM_EPS = 1e-5
#: ``cola_curvature.models.gpt.RMSNorm``'s default ``eps``.
RMSNORM_EPS = 1e-6


class GPTConfigLike(Protocol):
    """The attributes of :class:`~cola_curvature.models.GPTConfig` the JAX twin reads."""

    vocab_size: int
    context: int
    n_layer: int
    n_head: int
    n_embd: int
    tie_weights: bool
    attention: str
    norm: str
    bias: bool
    classes_first: bool


def check_config(config: GPTConfigLike) -> None:
    """Raise for a config the JAX twin does not implement."""
    if config.attention != "sdpa":
        raise NotImplementedError(
            f"The JAX GPT implements attention='sdpa' only (nanoGPT's packed c_attn), got "
            f"{config.attention!r}; build the config with attention='sdpa'."
        )
    if config.norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {config.norm!r}.")
    if config.n_embd % config.n_head != 0:
        raise ValueError(
            f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}; "
            "change one of them."
        )


def linear(params: Params, name: str, x: jax.Array, bias: bool) -> jax.Array:
    """``nn.Linear`` on the last axis: ``x Wᵀ + b`` with ``W`` of shape ``(out, in)``."""
    y = x @ params[f"{name}.weight"].T
    return y + params[f"{name}.bias"] if bias else y


def layer_norm(params: Params, name: str, x: jax.Array, bias: bool) -> jax.Array:
    """``nn.LayerNorm``: ``(x − mean(x)) / √(var(x) + ε) · w + b`` over the last axis."""
    centred = x - x.mean(-1, keepdims=True)
    y = centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + LAYERNORM_EPS)
    y = y * params[f"{name}.weight"]
    return y + params[f"{name}.bias"] if bias else y


def rms_norm(params: Params, name: str, x: jax.Array) -> jax.Array:
    """``x / √(mean(x²) + ε) · w`` over the last axis."""
    return x / jnp.sqrt((x**2).mean(-1, keepdims=True) + RMSNORM_EPS) * params[f"{name}.weight"]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Per head ``softmax(q kᵀ / √d + M) v``, ``M_ij = −∞`` for ``j > i``; ``(N, H, T, d)``."""
    t, d = q.shape[-2:]
    scores = jnp.einsum("nhid,nhjd->nhij", q, k) / math.sqrt(d)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    # the smallest finite number, not −∞: exp gives 0 all the same, and no ∞·0 in derivatives
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores, axis=-1) @ v


def gpt_model_fn(config: GPTConfigLike) -> Callable[[Params, jax.Array], jax.Array]:
    """Return ``model_fn(params, idx)``: the logits of :class:`~cola_curvature.models.GPT`.

    ``h_0 = W_te[idx] + W_pe[0:T]``; per block ``h ← h + c_proj(attn(c_attn(norm_1(h))))`` and
    ``h ← h + c_proj(gelu(c_fc(norm_2(h))))`` with the exact (erf) GELU, as ``F.gelu``;
    ``logits = norm_f(h) W_headᵀ`` with ``W_head = W_te`` when ``config.tie_weights``.
    ``idx`` holds token ids ``(N, T)``, ``T ≤ config.context``; the logits are ``(N, V, T)``
    when ``config.classes_first``, else ``(N, T, V)``.
    """
    check_config(config)
    bias, heads = config.bias, config.n_head
    head_name = "wte" if config.tie_weights else "lm_head"

    def norm(params: Params, name: str, x: jax.Array) -> jax.Array:
        if config.norm == "rmsnorm":
            return rms_norm(params, name, x)
        return layer_norm(params, name, x, bias)

    def attention(params: Params, name: str, x: jax.Array) -> jax.Array:
        n, t, e = x.shape
        q, k, v = jnp.split(linear(params, f"{name}.c_attn", x, bias), 3, axis=-1)
        q, k, v = (z.reshape(n, t, heads, e // heads).transpose(0, 2, 1, 3) for z in (q, k, v))
        y = causal_attention(q, k, v).transpose(0, 2, 1, 3).reshape(n, t, e)
        return linear(params, f"{name}.c_proj", y, bias)

    def mlp(params: Params, name: str, x: jax.Array) -> jax.Array:
        hidden = jax.nn.gelu(linear(params, f"{name}.c_fc", x, bias), approximate=False)
        return linear(params, f"{name}.c_proj", hidden, bias)

    def model_fn(params: Params, idx: jax.Array) -> jax.Array:
        t = idx.shape[1]
        if t > config.context:
            raise ValueError(
                f"sequence length {t} exceeds the context {config.context}; "
                "pass at most `context` tokens per sequence."
            )
        h = params["wte.weight"][idx] + params["wpe.weight"][:t]
        for layer in range(config.n_layer):
            block = f"blocks.{layer}"
            h = h + attention(params, f"{block}.attn", norm(params, f"{block}.ln_1", h))
            h = h + mlp(params, f"{block}.mlp", norm(params, f"{block}.ln_2", h))
        logits = norm(params, "ln_f", h) @ params[f"{head_name}.weight"].T
        return jnp.swapaxes(logits, 1, 2) if config.classes_first else logits

    return model_fn


def params_from_torch(model: Any) -> Params:
    """Return the weights of a torch ``GPT`` as a dict of JAX arrays keyed by parameter name.

    The keys are ``model.named_parameters()``'s (a tied lm-head weight appears once, as
    ``"wte.weight"``), the arrays are copies in torch's layouts and dtype, so later changes
    to the torch model do not reach them. A float64 model needs ``jax_enable_x64``.
    """
    from cola_curvature.models.gpt import GPT  # torch only here

    if not isinstance(model, GPT):
        raise TypeError(
            f"params_from_torch takes a cola_curvature.models.GPT, got {type(model).__name__}."
        )
    check_config(model.config)
    params = {}
    for name, p in model.named_parameters():
        array = p.detach().cpu().numpy()
        if array.itemsize == 8 and not jax.config.jax_enable_x64:
            raise ValueError(
                f"{name} is {p.dtype}, but JAX would truncate it to 32 bits; call "
                "jax.config.update('jax_enable_x64', True) first, or convert a float32 model."
            )
        params[name] = jnp.array(array, copy=True)
    return params


def init_params(config: GPTConfigLike, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Return GPT-2 initial weights in the layout of :func:`params_from_torch`, as ``GPT`` does.

    Matrices ``N(0, 0.02²)``, residual projections (``*.c_proj.weight``) scaled by
    ``1/√(2 n_layer)``; biases zero; norm weights one.
    """
    check_config(config)
    e, v = config.n_embd, config.vocab_size
    norms = ["ln_f"] + [f"blocks.{i}.ln_{j}" for i in range(config.n_layer) for j in (1, 2)]
    linears = {}
    for i in range(config.n_layer):
        linears |= {
            f"blocks.{i}.attn.c_attn": (3 * e, e),
            f"blocks.{i}.attn.c_proj": (e, e),
            f"blocks.{i}.mlp.c_fc": (4 * e, e),
            f"blocks.{i}.mlp.c_proj": (e, 4 * e),
        }
    matrices = {"wte.weight": (v, e), "wpe.weight": (config.context, e)}
    matrices |= {f"{name}.weight": shape for name, shape in linears.items()}
    if not config.tie_weights:
        matrices["lm_head.weight"] = (v, e)  # no bias, as torch's lm-head
    sizes = [math.prod(shape) for shape in matrices.values()]
    draws = jnp.split(jax.random.normal(key, (sum(sizes),), dtype), np.cumsum(sizes)[:-1])
    params = {}
    for draw, (name, shape) in zip(draws, matrices.items(), strict=True):
        scale = (2 * config.n_layer) ** -0.5 if name.endswith("c_proj.weight") else 1.0
        params[name] = 0.02 * scale * draw.reshape(shape)
    for name in norms:
        params[f"{name}.weight"] = jnp.ones(e, dtype)
    if config.bias:
        params |= {f"{name}.bias": jnp.zeros(shape[0], dtype) for name, shape in linears.items()}
        if config.norm == "layernorm":
            params |= {f"{name}.bias": jnp.zeros(e, dtype) for name in norms}
    return params
