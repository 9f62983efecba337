"""The per-backend operations losses need beyond CoLA's ``xnp``, chosen by the array type.

Only two: autodiff of a loss function on the outputs (for
:class:`~cola_curvature.losses_callable.CallableLoss`) and the regularized upper incomplete
gamma function (the Poisson CDF, for :class:`~cola_curvature.losses_extra.PoissonNLL`).
"""

from __future__ import annotations

from collections.abc import Callable

from cola_curvature.types import Array

LossFunction = Callable[[Array, Array], Array]


def _is_torch(x: Array) -> bool:
    """Return whether ``x`` is a torch tensor (otherwise it is a JAX array or tracer)."""
    return type(x).__module__.startswith("torch")


def loss_gradient(fn: LossFunction, f: Array, y: Array) -> Array:
    """Return ``∇_f Σ fn(f, y)``, the shape of ``f``.

    torch: one backward pass; the graph to ``f`` is kept when ``f`` requires grad.
    """
    if _is_torch(f):
        import torch

        with torch.enable_grad():
            x = f if f.requires_grad else f.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(fn(x, y).sum(), x, create_graph=f.requires_grad)
        return gradient
    import jax

    return jax.grad(lambda x: fn(x, y).sum())(f)


def loss_hessian_products(fn: LossFunction, f: Array, y: Array, tangents: Array) -> Array:
    """Return ``∇²_f Σ fn(f, y) · t`` for every ``t`` in ``tangents`` (shape ``(k, *f.shape)``).

    torch: double backward, one pass per tangent; JAX: ``jvp`` of ``grad``, mapped over
    the tangents. The result does not carry gradients to ``f``.
    """
    if _is_torch(f):
        import torch

        with torch.enable_grad():
            x = f.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(fn(x, y).sum(), x, create_graph=True)
            if not gradient.requires_grad:  # fn is affine in f: the Hessian is zero
                return torch.zeros_like(tangents)
            products = [
                torch.autograd.grad(gradient, x, t, retain_graph=True, allow_unused=True)[0]
                for t in tangents
            ]
        return torch.stack([torch.zeros_like(f) if p is None else p for p in products])
    import jax

    gradient = jax.grad(lambda x: fn(x, y).sum())
    return jax.vmap(lambda t: jax.jvp(gradient, (f,), (t,))[1])(tangents)


def upper_incomplete_gamma(a: Array, x: Array) -> Array:
    """Return the regularized upper incomplete gamma function ``Q(a, x) = Γ(a, x) / Γ(a)``."""
    if _is_torch(x):
        import torch

        return torch.special.gammaincc(a, x)
    import jax

    return jax.scipy.special.gammaincc(a, x)
