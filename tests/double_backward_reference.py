"""Dense float64 curvature references from reverse-mode autograd only, one vector at a time.

Nothing here uses ``cola_curvature``, ``vmap`` or forward-mode AD (``torch.func.hessian``
and ``jacfwd`` are a few per cent wrong on LayerNorm models in torch 2.13). Every matrix is
built from plain ``torch.autograd.grad`` loops on a flat parameter vector ``θ``:

- Hessian: ``H e_i = ∇_θ ⟨∇_θ L(θ), e_i⟩`` (double backward), one unit vector ``e_i`` at a
  time;
- model Jacobian: row ``r`` is ``∇_θ f_r(θ)``, one output entry at a time;
- output Hessian of the loss: double backward w.r.t. the outputs, one unit vector at a time;
- GGN ``R Σ_n J_nᵀ H_n J_n`` and (Monte-Carlo or empirical) Fisher ``R Σ_n g_n g_nᵀ``
  from those, with ``R`` torch's own reduction scale.

The risk is the torch loss, with its own reduction, on the concatenation of all batches, so
it is what the operators promise whatever the batching. Models run under the math kernel of
``F.scaled_dot_product_attention`` (the fused CPU kernel has no double backward; it computes
the same function).
"""

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.reference import concatenated, flat_params_and_unflatten, reduction_scale


def model_at(model, params):
    """Return ``(θ, x) ↦ f_θ(x)`` with only ``params`` replaced by the flat vector ``θ``.

    ``functional_call`` keeps tied parameters tied (``tie_weights=True``), so replacing a
    shared tensor replaces every use of it.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    _, unflatten = flat_params_and_unflatten(params)

    def evaluate(theta, x):
        # functional_call does not restore a module registered under two names
        originals = [(m, dict(m._parameters)) for m in model.modules()]
        with sdpa_kernel(SDPBackend.MATH):
            outputs = functional_call(model, dict(zip(keys, unflatten(theta), strict=True)), (x,))
        for module, parameters in originals:
            module._parameters.update(parameters)
        return outputs

    return evaluate


def _leaf(params):
    """Return the flat parameters as a fresh leaf that requires grad."""
    theta0, _ = flat_params_and_unflatten(params)
    return theta0.clone().requires_grad_(True)


def _rows(output, variable, count, retain_last=False):
    """Return ``[∇_variable ⟨output, e_r⟩ for r < count]`` stacked, one backward pass each."""
    flat = output.reshape(-1)
    eye = torch.eye(count, dtype=flat.dtype)
    rows = []
    for r in range(count):
        (row,) = torch.autograd.grad(
            flat, variable, eye[r], retain_graph=retain_last or r < count - 1, allow_unused=True
        )
        rows.append(torch.zeros_like(variable) if row is None else row)
    return torch.stack(rows).reshape(count, -1)


def total_risk(model, loss_func, params, data, theta=None):
    """Return ``L(θ)``: ``loss_func`` (with its reduction) on all batches joined."""
    X, Y = concatenated(data)
    theta = flat_params_and_unflatten(params)[0] if theta is None else theta
    return loss_func(model_at(model, params)(theta, X), Y)


def risk_gradient(model, loss_func, params, data, theta):
    """Return ``∇_θ L(θ)`` at the flat parameters ``theta`` (one backward pass)."""
    theta = theta.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(total_risk(model, loss_func, params, data, theta), theta)
    return gradient


def dense_hessian(model, loss_func, params, data):
    """Return ``∇²_θ L``, ``(D, D)``: column ``i`` is ``∇_θ ⟨∇_θ L, e_i⟩`` (double backward)."""
    theta = _leaf(params)
    (gradient,) = torch.autograd.grad(
        total_risk(model, loss_func, params, data, theta), theta, create_graph=True
    )
    return _rows(gradient, theta, theta.numel()).T


def dense_jacobian(model, params, inputs):
    """Return ``f(x)`` and ``∂f/∂θ`` of shape ``(numel(f), D)``, one backward pass per row."""
    theta = _leaf(params)
    outputs = model_at(model, params)(theta, inputs)
    return outputs.detach(), _rows(outputs, theta, outputs.numel())


def output_hessian(loss_func, output, target):
    """Return ``∇²_f ℓ(f, y)`` of the sum-reduced loss, ``(numel(f), numel(f))``."""
    summed = type(loss_func)(reduction="sum")
    f = output.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(summed(f, target), f, create_graph=True)
    return _rows(gradient, f, f.numel())


def dense_ggn(model, loss_func, params, data):
    """Return ``G = R Σ_n J_nᵀ H_n J_n`` with ``H_n`` the output Hessian of example ``n``."""
    X, Y = concatenated(data)
    outputs, jacobian = dense_jacobian(model, params, X)
    per_example = jacobian.reshape(outputs.shape[0], -1, jacobian.shape[1])
    ggn = torch.zeros(jacobian.shape[1], jacobian.shape[1], dtype=jacobian.dtype)
    for n, J_n in enumerate(per_example):
        ggn += J_n.T @ output_hessian(loss_func, outputs[n : n + 1], Y[n : n + 1]) @ J_n
    return reduction_scale(loss_func, outputs, Y) * ggn


def per_example_gradients(model, loss_func, params, inputs, target_sets):
    """Return ``(M, N, D)``: ``∇_θ ℓ(f_θ(x_n), y_{mn})`` of the sum-reduced loss.

    ``target_sets`` has shape ``(M, N, ...)`` (``M`` sets of targets). Example ``n`` runs
    forward alone, then one backward pass per target set: a plain loop over examples.
    """
    summed = type(loss_func)(reduction="sum")
    evaluate = model_at(model, params)
    rows = []
    for n in range(len(inputs)):
        theta = _leaf(params)
        output = evaluate(theta, inputs[n : n + 1])
        rows.append(
            torch.stack(
                [
                    torch.autograd.grad(
                        summed(output, targets[n : n + 1]),
                        theta,
                        retain_graph=m < len(target_sets) - 1,
                    )[0]
                    for m, targets in enumerate(target_sets)
                ]
            )
        )
    return torch.stack(rows, dim=1)


def dense_empirical_fisher(model, loss_func, params, data):
    """Return ``R Σ_n g_n g_nᵀ`` from the per-example gradients ``g_n`` (a loop over ``n``)."""
    X, Y = concatenated(data)
    gradients = per_example_gradients(model, loss_func, params, X, Y[None])[0]
    with torch.no_grad():
        outputs = model_at(model, params)(flat_params_and_unflatten(params)[0], X)
    return reduction_scale(loss_func, outputs, Y) * gradients.T @ gradients


def dense_mc_fisher(model, loss_func, params, data, sampled_targets):
    """Return ``(R / M) Σ_{n,m} g_{nm} g_{nmᵀ}`` for sampled targets ``ŷ`` of shape ``(M, N, ...)``.

    ``g_{nm}`` is the gradient of the sum-reduced loss of example ``n`` at target
    ``ŷ_{nm}``; ``R`` is the reduction scale of ``loss_func`` on the data's own targets.
    """
    X, Y = concatenated(data)
    gradients = per_example_gradients(model, loss_func, params, X, sampled_targets)
    flat = gradients.reshape(-1, gradients.shape[-1])
    with torch.no_grad():
        outputs = model_at(model, params)(flat_params_and_unflatten(params)[0], X)
    scale = reduction_scale(loss_func, outputs, Y) / sampled_targets.shape[0]
    return scale * flat.T @ flat


def finite_difference_hessian(model, loss_func, params, data, step):
    """Return ``(∇L(θ + h e_i) - ∇L(θ - h e_i)) / 2h`` for every ``i``: ``H + O(h²)``."""
    theta0, _ = flat_params_and_unflatten(params)
    eye = torch.eye(theta0.numel(), dtype=theta0.dtype)
    columns = [
        risk_gradient(model, loss_func, params, data, theta0 + step * e)
        - risk_gradient(model, loss_func, params, data, theta0 - step * e)
        for e in eye
    ]
    return torch.stack(columns, dim=1) / (2 * step)
