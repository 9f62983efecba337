"""``KFAC``: a torch optimizer stepping along ``(K + λI)^{-1} g`` with KFAC's Kronecker factors."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from cola_curvature.backends import curvature_backend
from cola_curvature.operators.kfac import KFAC as KFACOperator
from cola_curvature.operators.kronecker_blocks import DiagonalBlock, KroneckerBlock
from cola_curvature.operators.parameter_kronecker import ParameterKroneckerFactored
from cola_curvature.optim._options import check_curvature_options, check_step_options
from cola_curvature.optim.symmetry_statistics import apply_step, debiased, moving_average
from cola_curvature.options import FisherType, Uncovered, parse_option
from cola_curvature.preconditioning import preconditioned_step

#: The key of the optimizer-wide state (the Kronecker factors) in ``state_dict()["state"]``.
STATE_KEY = "kfac"


def block_factors(block: Any) -> list[torch.Tensor]:
    """Return a KFAC block's statistics: ``[G, A]`` of ``G ⊗ A``, or ``[d]`` of ``diag(d)``."""
    if isinstance(block, KroneckerBlock):
        return [block.output_factor, block.input_factor]
    if isinstance(block, DiagonalBlock):
        return [block.values]
    raise TypeError(f"KFAC optimizer cannot average a block of type {type(block).__name__}.")


def factor_block(factors: list[torch.Tensor]) -> KroneckerBlock | DiagonalBlock:
    """Return the block of :func:`block_factors`' statistics."""
    return KroneckerBlock(*factors) if len(factors) == 2 else DiagonalBlock(factors[0])


class KFAC(torch.optim.Optimizer):
    r"""Steps ``θ ← θ − lr ((K + λ I)^{-1} g + w θ)`` with ``K`` the KFAC curvature of the batches.

    ``step(batch)`` reads the gradient ``g`` from each parameter's ``.grad`` (call
    ``loss.backward()`` first, as for any optimizer) and takes the ``(X, y)`` batch the
    gradient came from. Every ``update_interval`` steps (from the first) it builds
    :class:`~cola_curvature.KFAC` on that batch alone, ``cc.KFAC(model, loss_func, params,
    [batch], fisher_type=..., uncovered=...)``, and folds its factors into moving
    averages, ``G_t = β G_{t−1} + (1 − β) G``, ``A_t`` likewise (a diagonal block of
    uncovered parameters, its diagonal), each debiased by ``1 − β^t`` (``t`` counting the
    refreshes); the averaged blocks ``Ĝ ⊗ Â`` are the preconditioner until the next
    refresh. ``batch`` may be ``None`` on the steps in between. The direction is
    :func:`~cola_curvature.preconditioned_step` with power ``−1``, exact eigen-damping
    ``λ``; heavy-ball momentum acts on it and weight decay ``w`` is decoupled, as in
    :class:`~cola_curvature.optim.SymmetryPreconditioned`. With ``fisher_type="mc"`` the
    targets of refresh ``t`` are sampled with seed ``seed + step``, new ones each time.

    Covered parameters are those of ``Linear``, ``Conv2d`` and ``Embedding`` calls (see
    :class:`~cola_curvature.KFAC`); the others get ``uncovered`` (default ``"diagonal"``:
    their exact curvature diagonal). All parameter groups share one KFAC operator (one
    ``damping``, ``update_interval``, ``beta``); ``lr``, ``momentum`` and ``weight_decay``
    are per group. State (``state_dict()``): per parameter ``momentum_buffer``; under the
    key ``"kfac"`` the step and refresh counts, the moving factors, the frozen (debiased)
    factors and the block permutation, so a loaded optimizer continues exactly.

    Args:
        model: The ``torch.nn.Module``.
        loss_func: As for :class:`~cola_curvature.KFAC` (e.g. ``nn.CrossEntropyLoss()``).
        params: The parameters: tensors or parameter-group dicts.
        lr: Learning rate ``≥ 0``.
        damping: ``λ > 0``.
        update_interval: Steps between refreshed factors (and eigendecompositions), ``≥ 1``.
        beta: Moving-average factor ``β ∈ [0, 1)`` of the factors (``0``: the latest batch).
        fisher_type: ``"mc"`` (default), ``"empirical"`` or ``"type-2"``.
        uncovered: ``"diagonal"`` (default), ``"dense"`` or ``"error"``.
        seed: Base seed of the sampled targets.
        momentum: ``μ ∈ [0, 1)``.
        weight_decay: ``w ≥ 0``.
        **kfac_options: Passed on to :class:`~cola_curvature.KFAC` (``kfac_approx``,
            ``mc_samples``, ``batch_size_fn``, ``check_deterministic`` (default here
            ``False``), ...).

    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_func: Any,
        params: Iterable[Any],
        lr: float = 0.1,
        *,
        damping: float = 1e-3,
        update_interval: int = 1,
        beta: float = 0.95,
        fisher_type: str = "mc",
        uncovered: str = "diagonal",
        seed: int = 0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        **kfac_options: Any,
    ) -> None:
        check_curvature_options(beta, damping, update_interval, -1.0)
        self.model, self.loss_func = model, loss_func
        self.damping, self.update_interval, self.beta = damping, update_interval, beta
        self.seed = seed
        self.kfac_options = {
            "fisher_type": parse_option(FisherType, fisher_type, "fisher_type"),
            "uncovered": parse_option(Uncovered, uncovered, "uncovered"),
            "check_deterministic": False,
            **kfac_options,
        }
        self._preconditioner: ParameterKroneckerFactored | None = None
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its options (``ValueError`` naming the option)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_step_options(group["lr"], group["momentum"], group["weight_decay"])
        self._preconditioner = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state; the preconditioner is rebuilt from the frozen factors."""
        super().load_state_dict(state_dict)
        self._preconditioner = None

    def _params(self) -> list[torch.Tensor]:
        return [param for group in self.param_groups for param in group["params"]]

    def _refresh(self, batch: Any, count: int) -> None:
        """Build KFAC on ``batch`` and fold its factors into the moving averages."""
        if batch is None:
            raise ValueError(
                f"step {count} refreshes the KFAC factors and needs the batch: call step((X, y))."
            )
        operator = KFACOperator(
            self.model,
            self.loss_func,
            self._params(),
            [batch],
            seed=self.seed + count - 1,
            **self.kfac_options,
        )
        state = self.state[STATE_KEY]
        previous = state.get("factors", [None] * len(operator.blocks))
        if len(previous) != len(operator.blocks):
            raise ValueError(
                f"KFAC found {len(operator.blocks)} blocks on this batch and "
                f"{len(previous)} before; the model's layers must not change between steps."
            )
        state["refreshes"] = refreshes = state.get("refreshes", 0) + 1
        state["factors"] = [
            moving_average(old, block_factors(block), self.beta)
            for old, block in zip(previous, operator.blocks, strict=True)
        ]
        state["frozen"] = [debiased(factors, refreshes, self.beta) for factors in state["factors"]]
        state["permutation"] = operator.permutation
        self._preconditioner = None

    def _curvature(self) -> ParameterKroneckerFactored:
        """Return the preconditioner ``P · BlockDiag(Ĝ ⊗ Â) · Pᵀ`` of the frozen factors."""
        if self._preconditioner is None:
            state = self.state[STATE_KEY]
            self._preconditioner = ParameterKroneckerFactored(
                curvature_backend(self.model, self.loss_func, self._params()),
                [factor_block(factors) for factors in state["frozen"]],
                state["permutation"],
            )
        return self._preconditioner

    def step(self, batch: Any = None) -> None:
        """Update every parameter that has a ``.grad``, preconditioned by KFAC of ``batch``."""
        state = self.state[STATE_KEY]
        state["step"] = count = state.get("step", 0) + 1
        if (count - 1) % self.update_interval == 0:
            self._refresh(batch, count)
        params = self._params()
        gradients = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        directions = preconditioned_step(self._curvature(), gradients, self.damping, power=-1.0)
        direction_of = dict(zip(map(id, params), directions, strict=True))
        with torch.no_grad():
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    apply_step(param, direction_of[id(param)], self.state[param], group)
