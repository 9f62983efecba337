"""The benchmark models in torch and, with the same weights, in plain JAX; one random batch each.

Models (mean cross-entropy, float32, fixed seeds):

- ``mlp``: MLP 784-256-256-10 with tanh, batch 128.
- ``cnn``: Conv 16 3×3 – ReLU – MaxPool 2 – Conv 32 3×3 – ReLU – MaxPool 2 – Linear 64 –
  ReLU – Linear 10 on 3×32×32, batch 128.
- ``transformer``: one pre-LayerNorm transformer block on 128 sequences of 16 tokens from a
  vocabulary of 10 (one-hot inputs, embedded by a bias-free ``nn.Linear`` plus a fixed
  sinusoidal position code), width 64, 4 heads, MLP 64-256-64 with GELU, a final
  LayerNorm, the mean over tokens and a ``Linear(64, 10)`` head: a 2-d output, so every
  curvlinops operator (its EKFAC needs 2-d outputs) runs on it. Only ``nn.Linear`` and
  ``nn.LayerNorm`` hold parameters. KFAC covers ``Linear``/``Conv2d`` only, so its rows
  take the ``Linear`` parameters (:func:`kfac_params`), in both libraries.
- ``tiny``: MLP 12-8-4 with tanh on a batch of 8, for the harness's own test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

MODELS = ("mlp", "cnn", "transformer")
ALL_MODELS = (*MODELS, "tiny")
SEED = 0
VOCAB = 10
SEQ_LEN = 16
WIDTH = 64
HEADS = 4


def _sinusoid(length: int, width: int) -> np.ndarray:
    """Return the fixed sinusoidal position code, ``(length, width)`` in float32."""
    position = np.arange(length)[:, None]
    frequency = np.exp(-math.log(10_000.0) * np.arange(0, width, 2) / width)
    code = np.zeros((length, width), dtype=np.float32)
    code[:, 0::2] = np.sin(position * frequency)
    code[:, 1::2] = np.cos(position * frequency)
    return code


class TransformerBlock(nn.Module):
    """One pre-LayerNorm transformer block with a pooled classification head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(VOCAB, WIDTH, bias=False)
        self.register_buffer("position", torch.from_numpy(_sinusoid(SEQ_LEN, WIDTH)))
        self.norm1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 4 * WIDTH)
        self.fc2 = nn.Linear(4 * WIDTH, WIDTH)
        self.norm3 = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map one-hot tokens ``(N, T, V)`` to class scores ``(N, V)``."""
        h = self.embed(x) + self.position
        n, t, _ = h.shape
        qkv = self.qkv(self.norm1(h)).reshape(n, t, 3, HEADS, WIDTH // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(WIDTH // HEADS)).softmax(-1)
        h = h + self.proj((scores @ v).transpose(1, 2).reshape(n, t, WIDTH))
        h = h + self.fc2(nn.functional.gelu(self.fc1(self.norm2(h))))
        return self.head(self.norm3(h).mean(1))


def torch_problem(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Return a model (eval mode) and one random batch ``(X, y)``, all from fixed seeds."""
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED + 1)
    batch, classes = 128, 10
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        )
        X = torch.randn(batch, 784, generator=generator)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 6 * 6, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
        X = torch.randn(batch, 3, 32, 32, generator=generator)
    elif name == "transformer":
        model = TransformerBlock()
        tokens = torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=generator)
        X = nn.functional.one_hot(tokens, VOCAB).float()
    elif name == "tiny":
        batch, classes = 8, 4
        model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, classes))
        X = torch.randn(batch, 12, generator=generator)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(ALL_MODELS)}.")
    y = torch.randint(0, classes, (batch,), generator=generator)
    return model.eval(), X, y


def kfac_params(model: nn.Module) -> list[torch.Tensor]:
    """Return the parameters of the model's ``Linear``/``Conv2d`` layers (what KFAC covers)."""
    return [
        p
        for module in model.modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
        for p in module.parameters(recurse=False)
    ]


def _linear(params: dict, name: str, x: Any) -> Any:
    """``nn.Linear`` on the last axis: ``x Wᵀ + b``, ``W`` of shape ``(out, in)``."""
    out = x @ params[f"{name}.weight"].T
    bias = params.get(f"{name}.bias")
    return out if bias is None else out + bias


def _jax_model_fn(name: str) -> Callable[[dict, Any], Any]:
    """Return ``model_fn(params, x)``, the JAX twin of :func:`torch_problem`'s model."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def conv(params: dict, name: str, x: Any) -> Any:
        out = lax.conv_general_dilated(
            x, params[f"{name}.weight"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return out + params[f"{name}.bias"][None, :, None, None]

    def pool(x: Any) -> Any:
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def layer_norm(params: dict, name: str, x: Any) -> Any:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        normed = (x - mean) / jnp.sqrt(var + 1e-5)
        return normed * params[f"{name}.weight"] + params[f"{name}.bias"]

    def mlp(params: dict, x: Any) -> Any:
        h = jnp.tanh(_linear(params, "0", x))
        return _linear(params, "4", jnp.tanh(_linear(params, "2", h)))

    def cnn(params: dict, x: Any) -> Any:
        h = pool(jax.nn.relu(conv(params, "0", x)))
        h = pool(jax.nn.relu(conv(params, "3", h))).reshape(x.shape[0], -1)
        return _linear(params, "9", jax.nn.relu(_linear(params, "7", h)))

    position = jnp.asarray(_sinusoid(SEQ_LEN, WIDTH))

    def transformer(params: dict, x: Any) -> Any:
        h = _linear(params, "embed", x) + position
        n, t, _ = h.shape
        qkv = _linear(params, "qkv", layer_norm(params, "norm1", h))
        q, k, v = qkv.reshape(n, t, 3, HEADS, WIDTH // HEADS).transpose(2, 0, 3, 1, 4)
        scores = jax.nn.softmax(q @ k.swapaxes(-2, -1) / math.sqrt(WIDTH // HEADS), axis=-1)
        h = h + _linear(params, "proj", (scores @ v).swapaxes(1, 2).reshape(n, t, WIDTH))
        hidden = jax.nn.gelu(_linear(params, "fc1", layer_norm(params, "norm2", h)), False)
        h = h + _linear(params, "fc2", hidden)
        return _linear(params, "head", layer_norm(params, "norm3", h).mean(1))

    def tiny(params: dict, x: Any) -> Any:
        return _linear(params, "2", jnp.tanh(_linear(params, "0", x)))

    return {"mlp": mlp, "cnn": cnn, "transformer": transformer, "tiny": tiny}[name]


def jax_problem(name: str) -> tuple[Callable[[dict, Any], Any], dict, Any, Any]:
    """Return ``(model_fn, params, X, y)`` in JAX with the weights and batch of the torch problem.

    ``params`` is a dict keyed by the torch parameter names. Raises if the JAX twin's loss
    differs from torch's by more than float32 rounding, so both frameworks time one function.
    """
    import jax
    import jax.numpy as jnp

    model, X, y = torch_problem(name)
    params = {key: jnp.asarray(p.detach().numpy()) for key, p in model.named_parameters()}
    model_fn = _jax_model_fn(name)
    jax_X, jax_y = jnp.asarray(X.numpy()), jnp.asarray(y.numpy())
    logits = model_fn(params, jax_X)
    jax_loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), jax_y[:, None], 1).mean()
    with torch.no_grad():
        torch_loss = nn.functional.cross_entropy(model(X), y).item()
    if abs(float(jax_loss) - torch_loss) > 1e-5 * max(1.0, abs(torch_loss)):
        raise RuntimeError(
            f"the JAX {name} gives loss {float(jax_loss)!r}, torch {torch_loss!r}: twins differ."
        )
    return model_fn, params, jax_X, jax_y
