"""Check in float64 that the curvature products equal dense ``torch.func`` references.

Small MLPs and CNNs (one with in-place ReLUs and an eval-mode BatchNorm, one MLP with a
custom ``autograd.Function`` whose backward is ``@once_differentiable``), MSE and
cross-entropy with ``"sum"`` and ``"mean"``, two uneven batches, one vector and a
3-column matrix: Hessian against ``torch.func.hessian`` of the risk, GGN against
``Jᵀ H_f J`` from an explicit Jacobian, empirical Fisher against per-example gradients,
and the Monte-Carlo Fisher's matrix product against its own column-by-column products
(the sampled targets must be shared by all columns). Exits non-zero when a relative
error exceeds ``1e-10``. Run from the repository root::

    .venv/bin/python -m benchmarks.check_products_float64
"""

from __future__ import annotations

import itertools
import sys

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, hessian, jacrev, vmap

import cola_curvature as cc

RTOL = 1e-10
NUM_COLUMNS = 3


class _Tanh(torch.autograd.Function):
    """``tanh`` with a first-order-only backward and a forward-mode rule."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return tangent * (1 - y * y)


class CustomTanh(nn.Module):
    """``tanh`` through :class:`_Tanh` (double backward through it is silently zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Tanh.apply(x)


def models() -> dict[str, tuple[nn.Module, tuple[int, ...], nn.Module]]:
    """Return small float64 models, input shapes and twins with the same math for references.

    The twin differs only for the custom-Function MLP, whose reference uses ``torch.tanh``.
    """
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )
    cnn_inplace = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
        nn.ReLU(inplace=True),
        nn.Linear(3, 3),
    )
    with torch.no_grad():
        cnn_inplace[1].running_mean.uniform_(-0.5, 0.5)
        cnn_inplace[1].running_var.uniform_(0.5, 1.5)
    cnn_inplace.eval()
    custom = nn.Sequential(nn.Linear(5, 6), CustomTanh(), nn.Linear(6, 3)).double()
    twin = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    twin.load_state_dict(custom.state_dict())
    return {
        "mlp": (mlp.double(), (5,), mlp),
        "cnn": (cnn.double(), (2, 8, 8), cnn),
        "cnn-inplace-bn": (cnn_inplace.double(), (2, 8, 8), cnn_inplace),
        "mlp-custom-function": (custom, (5,), twin),
    }


def problem(model: nn.Module, shape: tuple[int, ...], loss_func: nn.Module) -> tuple:
    """Return ``(params, data, X, y)`` with two uneven batches of random float64 data."""
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(9, *shape, dtype=torch.float64, generator=generator)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        y = torch.randint(0, 3, (9,), generator=generator)
    else:
        y = torch.randn(9, 3, dtype=torch.float64, generator=generator)
    params = [p for p in model.parameters() if p.requires_grad]
    return params, [(X[:5], y[:5]), (X[5:], y[5:])], X, y


def references(model: nn.Module, loss_func: nn.Module, params: list, X, y) -> dict:
    """Return dense float64 Hessian, GGN and empirical Fisher of the whole data set."""
    names = [n for n, p in model.named_parameters() if any(p is q for q in params)]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    buffers = {n: b for n, b in model.named_buffers()}

    def unflat(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = flat.split(sizes)
        state = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return {**state, **buffers}

    def outputs(flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflat(flat), (inputs,))

    def risk(flat: torch.Tensor) -> torch.Tensor:
        return loss_func(outputs(flat, X), y)

    H = hessian(risk)(theta)
    f = outputs(theta, X).detach()
    J = jacrev(outputs)(theta, X)  # (N, C, D)
    H_f = hessian(lambda out: loss_func(out, y))(f)  # (N, C, N, C)
    G = torch.einsum("ncd,ncme,mef->df", J, H_f, J)
    mean = loss_func.reduction == "mean"
    terms = 1 if isinstance(loss_func, nn.CrossEntropyLoss) else f.shape[1]
    scale = 1.0 / (X.shape[0] * terms) if mean else 1.0
    summed = type(loss_func)(reduction="sum")

    def example_loss(flat: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return summed(outputs(flat, x[None]), t[None])

    per_example = vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(theta, X, y)
    E = scale * per_example.T @ per_example
    return {"Hessian": H, "GGN": G, "EmpiricalFisher": E}


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Return ``‖result - reference‖ / ‖reference‖``."""
    return float((result - reference).norm() / reference.norm().clamp_min(1e-300))


def main() -> int:
    """Run all cases, print each relative error and return the exit status."""
    worst = 0.0
    losses = [nn.MSELoss, nn.CrossEntropyLoss]
    for (name, (model, shape, twin)), loss_type, reduction in itertools.product(
        models().items(), losses, ["sum", "mean"]
    ):
        loss_func = loss_type(reduction=reduction)
        params, data, X, y = problem(model, shape, loss_func)
        dense = references(twin, loss_func, list(twin.parameters()), X, y)
        D = dense["GGN"].shape[0]
        generator = torch.Generator().manual_seed(2)
        V = torch.randn(D, NUM_COLUMNS, dtype=torch.float64, generator=generator)
        for label, reference in dense.items():
            op = getattr(cc, label)(model, loss_func, params, data)
            errors = [
                relative_error(op @ V[:, 0], reference @ V[:, 0]),
                relative_error(op @ V, reference @ V),
            ]
            worst = max(worst, *errors)
            case = f"{name}-{type(loss_func).__name__}-{reduction}-{label}"
            print(f"{case:45s} v: {errors[0]:.1e}  V: {errors[1]:.1e}")
        fisher = cc.FisherMC(model, loss_func, params, data, mc_samples=2, seed=3)
        together = fisher @ V
        apart = torch.stack([fisher @ V[:, i] for i in range(NUM_COLUMNS)], dim=1)
        error = relative_error(together, apart)
        worst = max(worst, error)
        case = f"{name}-{type(loss_func).__name__}-{reduction}-FisherMC"
        print(f"{case:45s} V vs columns: {error:.1e}")
    print(f"worst relative error {worst:.1e} (tolerance {RTOL:.0e})")
    return 0 if worst <= RTOL else 1


if __name__ == "__main__":
    sys.exit(main())
