"""Dense float64 ground truth built from flattened parameters with ``torch.func`` only.

Nothing here uses ``cola_curvature``: the total loss is the torch loss (with its own
reduction) on the concatenation of all batches, which is exactly the empirical risk the
operators promise whatever the batching.
"""

import torch
from torch.func import functional_call, grad, hessian, jacrev


def flat_params_and_unflatten(params):
    """Return the concatenated ``params`` and a function mapping a flat vector back."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def unflatten(flat):
        return [
            chunk.reshape(shape) for chunk, shape in zip(flat.split(sizes), shapes, strict=True)
        ]

    return torch.cat([p.detach().flatten() for p in params]), unflatten


def _concatenated(data):
    return torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])


def _model_at(model, params, unflatten):
    """Return ``flat -> (x -> model output)`` with only ``params`` replaced."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]

    def evaluate(flat, x):
        return functional_call(model, dict(zip(keys, unflatten(flat), strict=True)), (x,))

    return evaluate


def dense_hessian(model, loss_func, params, data):
    """``∇²_θ L`` by ``torch.func.hessian`` of the total loss."""
    flat, unflatten = flat_params_and_unflatten(params)
    evaluate = _model_at(model, params, unflatten)
    X, Y = _concatenated(data)
    return hessian(lambda theta: loss_func(evaluate(theta, X), Y))(flat)


def dense_ggn(model, loss_func, params, data):
    """``Jᵀ H J`` with the explicit Jacobian of all outputs and the Hessian of the total loss."""
    flat, unflatten = flat_params_and_unflatten(params)
    evaluate = _model_at(model, params, unflatten)
    X, Y = _concatenated(data)
    outputs = evaluate(flat, X).detach()
    jacobian = jacrev(lambda theta: evaluate(theta, X))(flat).reshape(-1, flat.numel())
    output_hessian = hessian(lambda f: loss_func(f.reshape(outputs.shape), Y))(outputs.flatten())
    return jacobian.T @ output_hessian @ jacobian


def risk_scale(loss_func, data, model):
    """``R`` such that the total loss is ``R`` times the sum-reduced loss (from torch itself)."""
    X, Y = _concatenated(data)
    with torch.no_grad():
        outputs = model(X)
    summed = type(loss_func)(reduction="sum")(outputs, Y)
    return (loss_func(outputs, Y) / summed).item()


def dense_empirical_fisher(model, loss_func, params, data):
    """``R Σ_n ∇ℓ_n ∇ℓ_nᵀ`` from per-example gradients of the sum-reduced per-example loss."""
    flat, unflatten = flat_params_and_unflatten(params)
    evaluate = _model_at(model, params, unflatten)
    X, Y = _concatenated(data)
    summed = type(loss_func)(reduction="sum")
    gradients = torch.stack(
        [
            grad(lambda theta, n=n: summed(evaluate(theta, X[n : n + 1]), Y[n : n + 1]))(flat)
            for n in range(X.shape[0])
        ]
    )
    return risk_scale(loss_func, data, model) * gradients.T @ gradients
