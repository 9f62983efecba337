"""Dense float64 ground truth for JAX models from ``jax.hessian`` and ``jax.jacfwd`` only.

Nothing here uses ``cola_curvature``: the losses are written out with ``jax.nn`` and the
total loss is taken on the concatenation of all batches. Each derivative is jit-compiled
as one program (eager ``jax.hessian`` dispatches op by op and is ~5x slower here).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def relative_error(actual, expected):
    """Return ``‖actual − expected‖ / ‖expected‖`` (Frobenius) of two arrays of any backend."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def total_loss(name, reduction, f, y):
    """The risk of outputs ``f`` and targets ``y`` for loss ``name`` and ``reduction``."""
    if name == "mse":
        terms = (f - y) ** 2
    elif name == "ce":
        terms = -jnp.take_along_axis(jax.nn.log_softmax(f, axis=1), y[:, None], axis=1)
    else:
        terms = jax.nn.softplus(f) - y * f
    return terms.sum() if reduction == "sum" else terms.mean()


def _concatenated(data):
    return jnp.concatenate([x for x, _ in data]), jnp.concatenate([y for _, y in data])


def dense_hessian(model_fn, name, reduction, params, data):
    """``∇²_θ L`` by ``jax.hessian`` of the total loss in flat parameters."""
    flat, unravel = ravel_pytree(params)
    X, Y = _concatenated(data)
    hessian = jax.jit(
        jax.hessian(lambda t: total_loss(name, reduction, model_fn(unravel(t), X), Y))
    )
    return hessian(flat)


def dense_ggn(model_fn, name, reduction, params, data):
    """``Jᵀ H J`` with the explicit ``jax.jacfwd`` Jacobian of all outputs."""
    flat, unravel = ravel_pytree(params)
    X, Y = _concatenated(data)
    outputs = model_fn(params, X)
    jacobian = jax.jit(jax.jacfwd(lambda t: model_fn(unravel(t), X).ravel()))(flat)
    output_hessian = jax.jit(
        jax.hessian(lambda f: total_loss(name, reduction, f.reshape(outputs.shape), Y))
    )(outputs.ravel())
    return jacobian.T @ output_hessian @ jacobian


def dense_empirical_fisher(model_fn, name, reduction, params, data):
    """``R Σ_n ∇ℓ_n ∇ℓ_nᵀ`` from per-example gradients (``vmap`` of ``grad``)."""
    flat, unravel = ravel_pytree(params)
    X, Y = _concatenated(data)

    def example_loss(t, x, y):
        return total_loss(name, "sum", model_fn(unravel(t), x[None]), y[None])

    gradients = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0)))(flat, X, Y)
    outputs = model_fn(params, X)
    scale = total_loss(name, reduction, outputs, Y) / total_loss(name, "sum", outputs, Y)
    return scale * gradients.T @ gradients
