"""Damped Newton step and curvature spectrum of a small regression MLP, end to end.

Trains a 1-20-20-1 tanh MLP on noisy ``sin`` data with Adam, then takes the best of a few
damped Newton steps ``θ ← θ - (G + λ I)⁻¹ ∇L`` with ``G`` the matrix-free GGN inverted by
CoLA's conjugate gradients, prints the loss before and after and the top Hessian and GGN
eigenvalues (ARPACK Lanczos through ``to_scipy()``), and writes a plot of the fit and of
both spectra to ``examples/output/demo.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cola
import matplotlib
import numpy as np
import scipy.sparse.linalg
import torch
from torch import nn

import cola_curvature as cc

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def make_data(num_points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``x ~ U[0, 8]`` and ``y = sin(x) + ε``, ``ε ~ N(0, 0.3²)``, in float64."""
    generator = torch.Generator().manual_seed(seed)
    x = 8 * torch.rand(num_points, 1, generator=generator, dtype=torch.float64)
    y = torch.sin(x) + 0.3 * torch.randn(num_points, 1, generator=generator, dtype=torch.float64)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """Fit ``model`` with full-batch Adam on the mean squared error."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def evaluate(
    model: nn.Module, params: list[torch.Tensor], step: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Return the model output at ``θ - step`` without changing the model."""
    names = {id(p): name for name, p in model.named_parameters()}
    state, offset = {}, 0
    for p in params:
        state[names[id(p)]] = p.detach() - step[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    with torch.no_grad():
        return torch.func.functional_call(model, state, (x,))


def top_eigenvalues(operator: cc.CurvatureOperator, k: int) -> np.ndarray:
    """Return the ``k`` eigenvalues of largest magnitude, descending, by matrix-free Lanczos."""
    values = scipy.sparse.linalg.eigsh(
        operator.to_scipy(), k=k, which="LM", return_eigenvectors=False
    )
    return np.sort(values)[::-1]


def main() -> None:
    """Run the pipeline and write the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--damping", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0], help="λ values to try"
    )
    parser.add_argument("--steps", type=int, default=300, help="Adam steps before Newton")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "output" / "demo.png"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = make_data(150, seed=0)
    model = nn.Sequential(
        nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 1)
    )
    model = model.double()
    loss_func = nn.MSELoss()
    data = [(x[:64], y[:64]), (x[64:128], y[64:128]), (x[128:], y[128:])]

    start = time.perf_counter()
    train(model, x, y, args.steps)
    print(f"trained {args.steps} Adam steps in {time.perf_counter() - start:.1f} s")

    params = list(model.parameters())
    ggn = cc.GGN(model, loss_func, params, data)
    hessian = cc.Hessian(model, loss_func, params, data)
    print(f"D = {ggn.shape[0]} parameters, N = {ggn.num_data} examples")

    with torch.no_grad():
        fit_before = model(x)
    loss_before = loss_func(fit_before, y).item()
    gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss_func(model(x), y), params)])
    print(f"loss after Adam {loss_before:.5f}  (noise floor 0.3² = 0.09)")

    best_loss, best_step = loss_before, torch.zeros_like(gradient)
    for damping in args.damping:
        start = time.perf_counter()
        damped = ggn + damping * cola.ops.I_like(ggn)
        solver = cola.linalg.CG(tol=1e-10, max_iters=1000)
        step = cola.linalg.inv(damped, alg=solver) @ gradient
        residual = (damped @ step - gradient).norm() / gradient.norm()
        loss = loss_func(evaluate(model, params, step, x), y).item()
        print(
            f"Newton-CG step λ = {damping:<6g} loss {loss:.5f}  relative residual "
            f"{residual:.1e}  ({time.perf_counter() - start:.2f} s)"
        )
        if loss < best_loss:
            best_loss, best_step = loss, step
    with torch.no_grad():
        offset = 0
        for p in params:
            p -= best_step[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        fit_after = model(x)
    loss_after = loss_func(fit_after, y).item()
    print(f"loss before {loss_before:.5f}  after the best Newton step {loss_after:.5f}")

    start = time.perf_counter()
    top_ggn, top_hessian = top_eigenvalues(ggn, 5), top_eigenvalues(hessian, 5)
    print(f"top-5 GGN eigenvalues      {np.array2string(top_ggn, precision=4)}")
    print(f"top-5 Hessian eigenvalues  {np.array2string(top_hessian, precision=4)}")
    print(f"eigenvalues by Lanczos in {time.perf_counter() - start:.2f} s")

    ggn_spectrum = np.linalg.eigvalsh(ggn.to_dense().numpy())[::-1]
    hessian_spectrum = np.linalg.eigvalsh(hessian.to_dense().numpy())[::-1]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    order = torch.argsort(x[:, 0])
    left.scatter(x[:, 0], y[:, 0], s=8, color="gray", label="data")
    left.plot(x[order, 0], fit_before[order, 0], label=f"Adam (loss {loss_before:.4f})")
    left.plot(x[order, 0], fit_after[order, 0], "--", label=f"+ Newton-CG (loss {loss_after:.4f})")
    left.set(xlabel="x", ylabel="y", title="fit")
    left.legend()
    right.semilogy(np.abs(ggn_spectrum), ".", label="GGN")
    right.semilogy(np.abs(hessian_spectrum), ".", label="|Hessian|")
    right.set(
        xlabel="index",
        ylabel="|eigenvalue|",
        title=f"spectra at the Newton point (D = {ggn.shape[0]})",
    )
    right.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
