"""KFAC factors from their definition, per example with explicit Jacobians (no cola_curvature).

For a layer ``s_t = W ã_t`` at shared positions ``t``, with ``J_{n,t} = ∂f_n/∂s_{n,t}``
(computed by ``torch.func.jacrev`` through a zero perturbation added to the layer output),
and an output-space matrix ``M_n`` (type-2: ``∇²_f ℓ_n`` by ``torch.func.hessian``;
empirical: ``d_n d_nᵀ`` with ``d_n = ∇_f ℓ_n``; mc: sampled ``d̂ d̂ᵀ`` averaged):

- expand: ``A = (1/(N T)) Σ_{n,t} ã ãᵀ``, ``G = R Σ_{n,t} J_{n,t}ᵀ M_n J_{n,t}``;
- reduce: ``A = (1/N) Σ_n ā ā ᵀ`` (``ā`` the mean over ``t``),
  ``G = R Σ_n (Σ_t J_{n,t})ᵀ M_n (Σ_t J_{n,t})``.
"""

import torch
from torch import nn
from torch.func import hessian, jacrev
from torch.nn.functional import unfold


def _torch_loss(loss_func, reduction):
    return type(loss_func)(reduction=reduction)


def _risk_scale(loss_func, outputs, targets):
    """R = (loss with the user's reduction) / (loss with reduction='sum') on the whole data."""
    summed = _torch_loss(loss_func, "sum")(outputs, targets)
    return (loss_func(outputs, targets) / summed).item()


def _layer_inputs(module, x):
    if isinstance(module, nn.Conv2d):
        patches = unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def reference_kfac_factors(model, loss_func, layer, data, fisher_type, approx, samples=None):
    """Return ``(G, A)`` of one ``Linear``/``Conv2d`` layer with weight and bias, densely.

    ``samples[n]`` lists sampled targets of example ``n`` for ``fisher_type="mc"``.
    """
    X = torch.cat([x for x, _ in data])
    Y = torch.cat([y for _, y in data])
    captured = {}
    handle = layer.register_forward_hook(lambda m, args, out: captured.update(a=args[0], s=out))
    with torch.no_grad():
        outputs = model(X)
    handle.remove()
    scale = _risk_scale(loss_func, outputs, Y)
    a = _layer_inputs(layer, captured["a"])
    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    N, T = a.shape[0], a.shape[1]
    if approx == "expand":
        A = torch.einsum("nti,ntj->ij", a, a) / (N * T)
    else:
        mean = a.mean(1)
        A = mean.T @ mean / N

    sum_loss = _torch_loss(loss_func, "sum")
    out_features = layer.weight.shape[0]
    G = torch.zeros(out_features, out_features, dtype=X.dtype)
    for n in range(N):
        x_n, y_n = X[n : n + 1], Y[n : n + 1]
        shape = captured["s"][n : n + 1].shape

        def output_given_perturbation(delta, x_n=x_n):
            hook = layer.register_forward_hook(lambda m, args, out: out + delta)
            try:
                return model(x_n)
            finally:
                hook.remove()

        zero = torch.zeros(shape, dtype=X.dtype)
        f_n = output_given_perturbation(zero).detach()
        jac = jacrev(output_given_perturbation)(zero).reshape(f_n.numel(), *shape[1:])
        if isinstance(layer, nn.Conv2d):
            jac = jac.flatten(start_dim=2).transpose(1, 2)
        jac = jac.reshape(f_n.numel(), T, out_features)
        if fisher_type == "type-2":
            M = hessian(lambda f, y=y_n, s=f_n.shape: sum_loss(f.reshape(s), y))(f_n.flatten())
        else:
            targets = [y_n] if fisher_type == "empirical" else samples[n]
            grads = [torch.func.grad(lambda f, y=t: sum_loss(f, y))(f_n).flatten() for t in targets]
            M = sum(torch.outer(g, g) for g in grads) / len(grads)
        if approx == "expand":
            G += torch.einsum("kto,kl,ltp->op", jac, M, jac)
        else:
            summed = jac.sum(1)
            G += summed.T @ M @ summed
    return scale * G, A
