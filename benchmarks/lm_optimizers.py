"""Compact reference optimizers for the language-model benchmark: Muon and two-sided Shampoo.

* :class:`Muon` (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/ and
  github.com/KellerJordan/Muon): Nesterov momentum ``b = μ b + (1 − μ) g``,
  ``u = (1 − μ) g + μ b``, orthogonalised by five quintic Newton–Schulz iterations
  (coefficients ``(3.4445, −4.7750, 2.0315)``, which drive every singular value of
  ``u / ‖u‖_F`` into about ``[0.7, 1.2]``: ``≈ U Vᵀ``), scaled by ``√max(1, rows/cols)``;
  ``θ ← (1 − lr w) θ − lr u``. For the 2-D hidden weights only; the caller gives the
  embeddings, norms and biases to AdamW, as the reference does.
* :class:`Shampoo` (Gupta et al., 2018; Adam grafting as in Anil et al., 2020): for a matrix
  ``G`` the moving averages ``L = β₂ L + (1 − β₂) G Gᵀ``, ``R = β₂ R + (1 − β₂) GᵀG``; every
  ``update_interval`` steps ``(L + ε λ_max I)^{-1/4}`` and ``(R + ε λ_max I)^{-1/4}`` from
  eigendecompositions; the direction ``L^{-1/4} m̂ R^{-1/4}`` (``m̂`` Adam's debiased first
  moment) rescaled to the norm of Adam's step ``m̂ / (√v̂ + δ)``. Parameters with fewer than
  two axes take Adam's step itself. Decoupled weight decay ``θ ← (1 − lr w) θ``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Return ``≈ U Vᵀ`` of ``update = U Σ Vᵀ`` by quintic Newton–Schulz (Jordan et al., 2024)."""
    a, b, c = NS_COEFFICIENTS
    x = update / (update.norm() + 1e-7)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Momentum orthogonalised by Newton–Schulz, for 2-D weights (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:
        """Update every 2-D parameter that has a ``.grad``."""
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
                buffer.lerp_(param.grad, 1 - mu)
                update = newton_schulz(param.grad.lerp(buffer, mu))
                update *= max(1.0, param.shape[0] / param.shape[1]) ** 0.5
                param.mul_(1 - lr * group["weight_decay"]).sub_(lr * update)


def _inverse_fourth_root(matrix: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Return ``(M + ε λ_max I)^{-1/4}`` of a symmetric PSD ``M`` from its eigendecomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp(min=0) + epsilon * values.max().clamp(min=1e-30)
    return (vectors * values ** (-0.25)) @ vectors.T


class Shampoo(torch.optim.Optimizer):
    """Two-sided Shampoo with Adam grafting (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        epsilon: float = 1e-6,
        adam_epsilon: float = 1e-8,
        update_interval: int = 10,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.epsilon, self.adam_epsilon, self.update_interval = (
            epsilon,
            adam_epsilon,
            update_interval,
        )

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a ``.grad``."""
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                state["step"] = t = state.get("step", 0) + 1
                first = state.setdefault("first", torch.zeros_like(param)).lerp_(grad, 1 - beta1)
                second = state.setdefault("second", torch.zeros_like(param))
                second.lerp_(grad * grad, 1 - beta2)
                m_hat = first / (1 - beta1**t)
                direction = m_hat / ((second / (1 - beta2**t)).sqrt() + self.adam_epsilon)
                if param.dim() == 2:
                    direction = self._shampoo(param, grad, m_hat, direction, state, beta2)
                param.mul_(1 - lr * group["weight_decay"]).sub_(lr * direction)

    def _shampoo(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        m_hat: torch.Tensor,
        adam: torch.Tensor,
        state: dict[str, Any],
        beta2: float,
    ) -> torch.Tensor:
        """Return ``L^{-1/4} m̂ R^{-1/4}`` rescaled to ``‖adam‖``, refreshing the roots."""
        left = state.setdefault("left", torch.zeros(param.shape[0], param.shape[0]))
        right = state.setdefault("right", torch.zeros(param.shape[1], param.shape[1]))
        left.lerp_(grad @ grad.T, 1 - beta2)
        right.lerp_(grad.T @ grad, 1 - beta2)
        if (state["step"] - 1) % self.update_interval == 0:
            state["left_root"] = _inverse_fourth_root(left, self.epsilon)
            state["right_root"] = _inverse_fourth_root(right, self.epsilon)
        direction = state["left_root"] @ m_hat @ state["right_root"]
        norm = direction.norm()
        return direction * (adam.norm() / norm) if norm > 0 else direction
