"""JAX twins of the torch test problems in ``tests/cases.py``: same architectures, weights, data.

A JAX problem keeps the torch parameter names as dict keys (``"0.weight"``), so its flat
order is the sorted names (``jax.flatten_util.ravel_pytree``), and :func:`torch_to_jax_order`
maps torch's flat order onto it.
"""

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import cola_curvature as cc
from tests.cases import Case

JAX_LOSSES = {"mse": cc.losses.MSE, "ce": cc.losses.CrossEntropy, "bce": cc.losses.BCEWithLogits}


def linear(params, name, x):
    """``torch.nn.Linear`` on the last axis: ``x Wᵀ + b`` with ``W`` of shape ``(out, in)``."""
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def mlp_fn(params, x):
    """``Sequential(Linear(4, 5), Tanh(), Linear(5, 3))``."""
    return linear(params, "2", jnp.tanh(linear(params, "0", x)))


def cnn_fn(params, x):
    """``Sequential(Conv2d(2, 3, 3), ReLU(), MaxPool2d(2), Flatten(), Linear(12, 3))``, NCHW."""
    h = jax.lax.conv_general_dilated(
        x, params["0.weight"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    h = jax.nn.relu(h + params["0.bias"][:, None, None])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    return linear(params, "4", h.reshape(h.shape[0], -1))


def sequence_fn(params, x, channels_first):
    """``tests.cases.SequenceModel``: one Linear shared over 3 positions, then a head."""
    out = linear(params, "head", jnp.tanh(linear(params, "shared", x)))
    return jnp.swapaxes(out, 1, 2) if channels_first else out


def to_jax(tensor):
    return jnp.asarray(tensor.detach().numpy())


@dataclass
class JaxProblem:
    """A JAX problem and the torch problem it was converted from."""

    model_fn: object
    loss: cc.losses.Loss
    params: dict
    data: list
    torch_problem: tuple

    @property
    def args(self):
        return self.model_fn, self.loss, self.params, self.data


def build_jax_problem(case: Case, seed=0) -> JaxProblem:
    """Convert the torch problem of ``case`` (models ``mlp``, ``cnn``, ``sequence``) to JAX."""
    model, loss_func, params, data = torch_problem = case.build(seed)
    if case.model == "mlp":
        model_fn = mlp_fn
    elif case.model == "cnn":
        model_fn = cnn_fn
    else:
        model_fn = partial(sequence_fn, channels_first=case.loss == "ce")
    jax_params = {name: to_jax(p) for name, p in model.named_parameters()}
    jax_data = [(to_jax(x), to_jax(y)) for x, y in data]
    loss = JAX_LOSSES[case.loss](reduction=loss_func.reduction)
    return JaxProblem(model_fn, loss, jax_params, jax_data, torch_problem)


def torch_to_jax_order(model):
    """Return ``perm`` with ``jax_flat = torch_flat[perm]`` for ``model``'s parameters."""
    indices, offset = {}, 0
    for name, p in model.named_parameters():
        indices[name] = np.arange(offset, offset + p.numel()).reshape(tuple(p.shape))
        offset += p.numel()
    return np.asarray(ravel_pytree(indices)[0])
