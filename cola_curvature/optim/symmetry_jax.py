"""``symmetry_preconditioned``: the JAX twin of ``SymmetryPreconditioned``, an optax-style pair."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cola_curvature.optim._options import (
    Grafting,
    check_curvature_options,
    check_step_options,
    parse_grafting,
    parse_group,
)
from cola_curvature.optim.symmetry_statistics import (
    debiased,
    grafted,
    momentum_step,
    moving_average,
    parameter_curvature,
    parameter_statistics,
    preconditioned_direction,
    structure_of,
)


class GradientTransformation(NamedTuple):
    """``(init, update)``, field for field ``optax.GradientTransformation`` (no optax import).

    ``init(params) -> state``; ``update(updates, state, params) -> (updates, state)``, the
    returned updates to be added to the parameters (``optax.apply_updates``).
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]


class SymmetryPreconditionedState(NamedTuple):
    """The step count and, per leaf (flattened order), a dict of its statistics."""

    count: jax.Array
    leaves: tuple[dict[str, Any], ...]


def symmetry_preconditioned(
    learning_rate: float,
    *,
    groups: str = "orthogonal-rows",
    beta: float = 0.95,
    damping: float = 1e-8,
    update_interval: int = 1,
    power: float = -0.5,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    grafting: str | None = None,
) -> GradientTransformation:
    r"""Return :class:`~cola_curvature.optim.SymmetryPreconditioned` as an optax-style pair.

    Same options, same state and the same step: each leaf with two or more axes is the
    matrix ``(first axis, rest)`` and gets its group's averaged curvature, every other leaf
    the diagonal ``diag(g ⊙ g)``; the update is ``−lr ((C + εI)^p g + λ θ)`` (grafted and
    with momentum as described there). Rows are a leaf's first axis, as in
    :class:`~cola_curvature.SymmetryCurvature`: for a flax ``(in, out)`` kernel,
    ``"orthogonal-rows"`` acts on its inputs (``"orthogonal-cols"`` is then the torch
    default's choice). One group for all leaves; combine several with
    ``optax.multi_transform``. Works under ``jax.jit``; there the frozen statistics are
    selected by ``jnp.where`` every step and their eigendecomposition recomputed each step
    (the same update as refreshing every ``update_interval`` steps, without the saving).
    ``update`` needs ``params`` (the leaves' shapes, weight decay).
    """
    check_step_options(learning_rate, momentum, weight_decay, lr_name="learning_rate")
    check_curvature_options(beta, damping, update_interval, power)
    group, graft = parse_group(groups), parse_grafting(grafting)

    def init(params: Any) -> SymmetryPreconditionedState:
        leaves = []
        for param in jax.tree_util.tree_leaves(params):
            zeros = jnp.zeros_like(param)
            statistics = list(parameter_statistics(structure_of(param.shape, group), zeros))
            leaf = {"statistics": statistics, "preconditioner": list(statistics)}
            if graft is Grafting.ADAM:
                leaf["second_moment"] = list(parameter_statistics(None, zeros))
            if momentum > 0:
                leaf["momentum_buffer"] = zeros
            leaves.append(leaf)
        return SymmetryPreconditionedState(jnp.zeros((), jnp.int32), tuple(leaves))

    def update_leaf(
        gradient: Any, leaf: dict[str, Any], param: Any, count: Any
    ) -> tuple[Any, dict[str, Any]]:
        structure = structure_of(param.shape, group)
        refresh = (count - 1) % update_interval == 0
        statistics = parameter_statistics(structure, gradient)
        average = moving_average(leaf["statistics"], statistics, beta)
        frozen = [
            jnp.where(refresh, new, old)
            for new, old in zip(debiased(average, count, beta), leaf["preconditioner"], strict=True)
        ]
        new_leaf = {"statistics": average, "preconditioner": frozen}
        curvature = parameter_curvature(structure, frozen, param.shape)
        direction = preconditioned_direction(curvature, gradient, damping, power)
        direction, second_moment = grafted(
            graft, direction, gradient, leaf.get("second_moment"), count, beta, damping
        )
        if second_moment is not None:
            new_leaf["second_moment"] = second_moment
        change, buffer = momentum_step(
            param, direction, leaf.get("momentum_buffer"), learning_rate, momentum, weight_decay
        )
        if buffer is not None:
            new_leaf["momentum_buffer"] = buffer
        return -change, new_leaf

    def update(
        updates: Any, state: SymmetryPreconditionedState, params: Any = None
    ) -> tuple[Any, SymmetryPreconditionedState]:
        if params is None:
            raise ValueError(
                "symmetry_preconditioned needs params in update(updates, state, params)."
            )
        gradients, treedef = jax.tree_util.tree_flatten(updates)
        count = state.count + 1
        results = [
            update_leaf(gradient, leaf, param, count)
            for gradient, leaf, param in zip(
                gradients, state.leaves, jax.tree_util.tree_leaves(params), strict=True
            )
        ]
        new_updates = jax.tree_util.tree_unflatten(treedef, [change for change, _ in results])
        return new_updates, SymmetryPreconditionedState(count, tuple(leaf for _, leaf in results))

    return GradientTransformation(init, update)
