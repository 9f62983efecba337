"""Dense float64 ground truth built from flattened parameters with ``torch.func`` only.

Nothing here uses ``cola_curvature``. The empirical risk is the torch loss, with its own
reduction, evaluated once on the concatenation of all batches: that is exactly the risk
the operators promise whatever the batching, including torch's "mean" over all output
elements (MSE, BCE) or over ``N·d1·…`` positions (cross-entropy).
"""

import math

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vjp

#: The torch losses the reference knows the reduction of.
SUPPORTED_LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


def flat_params_and_unflatten(params):
    """Return the concatenated ``params`` and a function mapping a flat vector back.

    The flat order is ``torch.cat([p.flatten() for p in params])``; ``unflatten`` maps a
    vector ``(D,)`` to tensors shaped like ``params`` and a matrix ``(D, k)`` to tensors of
    shape ``(*p.shape, k)``.
    """
    shapes = [tuple(p.shape) for p in params]
    sizes = [p.numel() for p in params]

    def unflatten(flat):
        trailing = tuple(flat.shape[1:])
        return [
            chunk.reshape(shape + trailing)
            for chunk, shape in zip(flat.split(sizes), shapes, strict=True)
        ]

    return torch.cat([p.detach().flatten() for p in params]), unflatten


def _check_loss(loss_func):
    """Refuse loss options whose scaling the reference does not model."""
    if not isinstance(loss_func, SUPPORTED_LOSSES):
        raise NotImplementedError(f"no reference for {type(loss_func).__name__}")
    if loss_func.reduction not in ("sum", "mean"):
        raise NotImplementedError(f"no reference for reduction {loss_func.reduction!r}")
    if getattr(loss_func, "weight", None) is not None:
        raise NotImplementedError("no reference for class or element weights")
    if getattr(loss_func, "pos_weight", None) is not None:
        raise NotImplementedError("no reference for pos_weight")
    if getattr(loss_func, "label_smoothing", 0.0) != 0.0:
        raise NotImplementedError("no reference for label smoothing")


def _cat(parts):
    """Concatenate batch inputs (tensors, dicts of tensors or tuples of tensors) along 0."""
    first = parts[0]
    if isinstance(first, dict):
        return {key: torch.cat([part[key] for part in parts]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(torch.cat(column) for column in zip(*parts, strict=True))
    return torch.cat(parts)


def _example(inputs, n):
    """Example ``n`` of concatenated inputs, keeping the batch axis (size 1)."""
    if isinstance(inputs, dict):
        return {key: value[n : n + 1] for key, value in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(value[n : n + 1] for value in inputs)
    return inputs[n : n + 1]


def _num_examples(inputs):
    """Number of examples in concatenated inputs."""
    if isinstance(inputs, dict):
        return next(iter(inputs.values())).shape[0]
    if isinstance(inputs, (list, tuple)):
        return inputs[0].shape[0]
    return inputs.shape[0]


def concatenated(data):
    """Return ``(X, Y)``: all batches of ``data`` joined along the example axis."""
    batches = list(data)
    if not batches:
        raise ValueError("the reference needs at least one batch")
    return _cat([x for x, _ in batches]), _cat([y for _, y in batches])


def reduction_scale(loss_func, outputs, targets=None):
    """``R`` with ``loss_func(outputs, Y) = R · Σ_n ℓ_n``, from torch's definition of "mean".

    ``"sum"``: ``R = 1``. ``"mean"``: ``MSELoss`` and ``BCEWithLogitsLoss`` divide by the
    number of output elements; ``CrossEntropyLoss`` on outputs ``(N, C, d1, …)`` divides by
    ``N·d1·…`` (every entry except the class axis), less the positions whose label is
    ``ignore_index`` when ``targets`` are given (torch leaves those out of sum and count).
    """
    _check_loss(loss_func)
    if loss_func.reduction == "sum":
        return 1.0
    if isinstance(loss_func, nn.CrossEntropyLoss):
        if outputs.ndim < 2:
            raise NotImplementedError("no reference for unbatched cross-entropy")
        if targets is not None and not targets.is_floating_point():  # class labels
            return 1.0 / (targets != loss_func.ignore_index).sum().item()
        return 1.0 / (outputs.shape[0] * math.prod(outputs.shape[2:]))
    return 1.0 / outputs.numel()


def _model_at(model, params):
    """Return ``(theta, x) -> model output`` with only ``params`` replaced by ``theta``.

    The model's other parameters and buffers are used as they are (``functional_call``).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    _, unflatten = flat_params_and_unflatten(params)

    def evaluate(theta, x):
        return functional_call(model, dict(zip(keys, unflatten(theta), strict=True)), (x,))

    return evaluate


def total_loss_function(model, loss_func, params, data):
    """Return ``(theta ↦ L(theta), theta0)``: the risk on all data, flat parameters."""
    _check_loss(loss_func)
    theta0, _ = flat_params_and_unflatten(params)
    evaluate = _model_at(model, params)
    X, Y = concatenated(data)
    return (lambda theta: loss_func(evaluate(theta, X), Y)), theta0


def dense_hessian(model, loss_func, params, data):
    """``∇²_θ L`` by ``torch.func.hessian`` of the total loss."""
    total_loss, theta0 = total_loss_function(model, loss_func, params, data)
    return hessian(total_loss)(theta0)


def dense_jacobian(model, params, inputs):
    """``∂f/∂θ`` of all outputs, shape ``(N·C·…, D)`` (outputs flattened row-major)."""
    theta0, _ = flat_params_and_unflatten(params)
    evaluate = _model_at(model, params)
    return jacrev(lambda theta: evaluate(theta, inputs))(theta0).reshape(-1, theta0.numel())


def dense_output_hessian(loss_func, outputs, targets):
    """``∇²_f L`` of the total loss w.r.t. all outputs, shape ``(N·C·…, N·C·…)``."""
    _check_loss(loss_func)
    outputs = outputs.detach()
    return hessian(lambda f: loss_func(f.reshape(outputs.shape), targets))(outputs.flatten())


def dense_ggn(model, loss_func, params, data):
    """``Jᵀ H J`` with the explicit Jacobian of all outputs and the output Hessian of ``L``.

    ``H`` is the Hessian of the total (reduced) loss w.r.t. the full output tensor, so it
    already carries the factor ``R`` of the reduction.
    """
    _check_loss(loss_func)
    X, Y = concatenated(data)
    theta0, _ = flat_params_and_unflatten(params)
    outputs = _model_at(model, params)(theta0, X)
    jacobian = dense_jacobian(model, params, X)
    return jacobian.T @ dense_output_hessian(loss_func, outputs, Y) @ jacobian


def per_example_gradients(model, loss_func, params, data):
    """``(N, D)`` gradients of the sum-reduced loss of each single example."""
    _check_loss(loss_func)
    theta0, _ = flat_params_and_unflatten(params)
    evaluate = _model_at(model, params)
    summed = type(loss_func)(reduction="sum")
    X, Y = concatenated(data)

    def example_gradient(n):
        x, y = _example(X, n), Y[n : n + 1]
        return grad(lambda theta: summed(evaluate(theta, x), y))(theta0)

    return torch.stack([example_gradient(n) for n in range(_num_examples(X))])


def dense_empirical_fisher(model, loss_func, params, data):
    """``R Σ_n ∇ℓ_n ∇ℓ_nᵀ`` from per-example gradients of the sum-reduced per-example loss."""
    X, Y = concatenated(data)
    theta0, _ = flat_params_and_unflatten(params)
    with torch.no_grad():
        outputs = _model_at(model, params)(theta0, X)
    gradients = per_example_gradients(model, loss_func, params, data)
    return reduction_scale(loss_func, outputs, Y) * gradients.T @ gradients


# --- matrix-free references, for models too large for a dense matrix ----------------------


def hessian_matmat(model, loss_func, params, data, V):
    """``∇²L V`` column by column, reverse-over-reverse (``grad`` of ``⟨∇L, v⟩``).

    (Forward-over-reverse trips over torch's immutable ``ZeroTensor`` tangents in
    ``MSELoss``'s backward.)
    """
    total_loss, theta0 = total_loss_function(model, loss_func, params, data)
    gradient = grad(total_loss)
    return torch.stack([grad(lambda theta, v=v: gradient(theta) @ v)(theta0) for v in V.T], dim=1)


def ggn_matmat(model, loss_func, params, data, V):
    """``Jᵀ H J V`` column by column: ``jvp`` of the outputs, output Hessian, ``vjp``.

    ``H (J v)`` is reverse-over-reverse, as in :func:`hessian_matmat`.
    """
    _check_loss(loss_func)
    theta0, _ = flat_params_and_unflatten(params)
    evaluate = _model_at(model, params)
    X, Y = concatenated(data)
    outputs, pullback = vjp(lambda theta: evaluate(theta, X), theta0)
    outputs = outputs.detach()
    output_gradient = grad(lambda f: loss_func(f, Y))
    columns = []
    for v in V.T:
        Jv = jvp(lambda theta: evaluate(theta, X), (theta0,), (v,))[1]
        HJv = grad(lambda f, Jv=Jv: (output_gradient(f) * Jv).sum())(outputs)
        columns.append(pullback(HJv)[0])
    return torch.stack(columns, dim=1)


def empirical_fisher_matmat(model, loss_func, params, data, V):
    """``R Gᵀ (G V)`` with the ``(N, D)`` per-example gradients ``G``."""
    X, Y = concatenated(data)
    theta0, _ = flat_params_and_unflatten(params)
    with torch.no_grad():
        outputs = _model_at(model, params)(theta0, X)
    gradients = per_example_gradients(model, loss_func, params, data)
    return reduction_scale(loss_func, outputs, Y) * gradients.T @ (gradients @ V)
