"""``SymmetryPreconditioned``: a torch optimizer preconditioning by symmetry-averaged curvature."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.optim._options import (
    check_curvature_options,
    check_step_options,
    parse_grafting,
    parse_group,
)
from cola_curvature.optim.symmetry_statistics import (
    apply_step,
    debiased,
    grafted,
    moving_average,
    parameter_curvature,
    parameter_statistics,
    preconditioned_direction,
    structure_of,
)


class SymmetryPreconditioned(torch.optim.Optimizer):
    r"""Steps ``θ ← θ − lr ((C + ε I)^p g + λ θ)`` with ``C`` the symmetry-averaged curvature.

    Model-free: each parameter's ``C`` depends only on its own ``.grad`` (see
    :mod:`cola_curvature.optim.symmetry_statistics`), so the optimizer runs in an ordinary
    loop, ``loss.backward(); opt.step()``. A parameter with two or more axes is the matrix
    ``G`` (``out × rest``; a convolution kernel ``(m, c, h, w)`` is ``(m, c h w)``) and gets
    the average of ``vec(G) vec(G)ᵀ`` over its group (:class:`~cola_curvature.SymmetryCurvature`'s
    closed forms); one with fewer axes (a bias, a norm scale) gets the diagonal
    ``diag(g ⊙ g)`` — Adam's curvature estimate, the average of ``g gᵀ`` over flipping each
    entry's sign — so with ``p = −1/2`` its update is RMSprop's ``g / √(v̂ + ε)``.

    The default group, ``"orthogonal-rows"`` (``W → QW``), gives ``C = I ⊗ GᵀG/m``, so
    ``(C + εI)^{-1/2} vec(G) = vec(G (GᵀG/m + εI)^{-1/2})``, which tends to ``√m U Vᵀ``
    (``G = U Σ Vᵀ``) as ``ε → 0``: the polar factor Muon steps along (the paper's
    Shampoo/Muon-like limit), from one ``n × n`` eigendecomposition per weight. Pick
    ``"orthogonal-cols"`` (``m × m``) when the input side is the larger one,
    ``"permutation-rows"`` for hidden-unit permutations, ``"orthogonal-both"`` for a
    normalised SGD step per weight.

    Per step and parameter: the statistics ``stat(g_t)`` enter the moving average
    ``M_t = β M_{t−1} + (1 − β) stat(g_t)``; every ``update_interval`` steps (from the
    first) the debiased ``M_t / (1 − β^t)`` is frozen as the preconditioner's statistics
    and its eigendecomposition computed once (:func:`~cola_curvature.preconditioned_step`
    reuses it until the next refresh). The direction ``d = (C + εI)^p g`` is optionally
    grafted, then the step is ``θ ← θ − lr (b + λ θ)`` with heavy-ball momentum
    ``b = μ b + d`` (``b = d`` for ``μ = 0``) and decoupled (AdamW-style) weight decay ``λ``.

    Grafting (``"adam"`` or ``"sgd"``) rescales each parameter's ``d`` to the norm of
    Adam's diagonal step ``g ⊙ (v̂ + ε)^{-1/2}`` (``v̂`` the debiased moving average of
    ``g ⊙ g`` with the same ``β``) or of ``g`` itself, keeping ``d``'s direction (Agarwal
    et al., 2020). It is not needed for the preconditioned direction itself; it fixes the
    step size: ``‖(C + εI)^{-1/2} g‖`` is ``√(m · rank G)`` in the Muon limit, whatever the
    gradient's scale, so layers of different shapes (and ``p = −1``, whose step grows as the
    gradient shrinks) take steps of different sizes for one learning rate. With grafting,
    a learning rate tuned for Adam (or SGD) carries over when ``momentum=0``; heavy-ball
    momentum ``μ`` then multiplies the steady-state step by about ``1 / (1 − μ)`` (10× at
    0.9), so divide such a rate by that. Off (``None``) by default.

    Options per parameter group (``torch.optim`` style): ``lr``, ``groups``, ``beta``,
    ``damping``, ``update_interval``, ``power``, ``momentum``, ``weight_decay``,
    ``grafting``. State (``state_dict()``): per parameter ``step``, the moving
    ``statistics``, the frozen ``preconditioner`` statistics, ``second_moment`` (Adam
    grafting) and ``momentum_buffer``. A model compiled with ``torch.compile`` trains the
    same as in eager mode (the step reads ``.grad``; tested); compiling ``step`` itself is
    not supported (eigendecompositions and Python control flow).

    Args:
        params: Tensors, or dicts of parameter groups, as for any ``torch.optim`` optimizer.
        lr: Learning rate ``lr ≥ 0``.
        groups: The symmetry group of every parameter with two or more axes in the group:
            ``"orthogonal-rows"`` (default), ``"orthogonal-cols"``, ``"orthogonal-both"`` or
            ``"permutation-rows"``.
        beta: Moving-average factor ``β ∈ [0, 1)`` of the statistics (``0``: current
            gradient only).
        damping: ``ε > 0``, added to ``C``'s eigenvalues (scale: entries of ``g ⊙ g``).
        update_interval: Steps between recomputed eigendecompositions, ``≥ 1``.
        power: ``p ≤ 0``: ``−1/2`` Shampoo/Muon-like (default), ``−1`` Newton-like.
        momentum: ``μ ∈ [0, 1)``.
        weight_decay: Decoupled weight decay ``λ ≥ 0``.
        grafting: ``None`` (default), ``"adam"`` or ``"sgd"`` (above).

    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        groups: str = "orthogonal-rows",
        beta: float = 0.95,
        damping: float = 1e-8,
        update_interval: int = 1,
        power: float = -0.5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        grafting: str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "groups": groups,
            "beta": beta,
            "damping": damping,
            "update_interval": update_interval,
            "power": power,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "grafting": grafting,
        }
        self._curvatures: dict[torch.Tensor, KroneckerFactored] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its options (``ValueError`` naming the option)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_step_options(group["lr"], group["momentum"], group["weight_decay"])
        check_curvature_options(
            group["beta"], group["damping"], group["update_interval"], group["power"]
        )
        group["groups"] = parse_group(group["groups"]).value
        grafting = parse_grafting(group["grafting"])
        group["grafting"] = None if grafting is None else grafting.value

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state; eigendecompositions are recomputed from the frozen statistics."""
        super().load_state_dict(state_dict)
        self._curvatures = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a ``.grad``; return ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, param.grad, group)
        return loss

    def _update(self, param: torch.Tensor, gradient: torch.Tensor, group: dict[str, Any]) -> None:
        if gradient.is_sparse:
            raise TypeError("SymmetryPreconditioned does not support sparse gradients.")
        state = self.state[param]
        structure = structure_of(param.shape, parse_group(group["groups"]))
        beta, grafting = group["beta"], parse_grafting(group["grafting"])
        state["step"] = count = state.get("step", 0) + 1
        statistics = parameter_statistics(structure, gradient)
        state["statistics"] = moving_average(state.get("statistics"), statistics, beta)
        if (count - 1) % group["update_interval"] == 0:
            state["preconditioner"] = debiased(state["statistics"], count, beta)
            self._curvatures.pop(param, None)
        if param not in self._curvatures:
            self._curvatures[param] = parameter_curvature(
                structure, state["preconditioner"], param.shape
            )
        direction = preconditioned_direction(
            self._curvatures[param], gradient, group["damping"], group["power"]
        )
        direction, second_moment = grafted(
            grafting, direction, gradient, state.get("second_moment"), count, beta, group["damping"]
        )
        if second_moment is not None:
            state["second_moment"] = second_moment
        apply_step(param, direction, state, group)
