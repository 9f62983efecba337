r"""Per-parameter statistics, curvature and step of the symmetry-preconditioned optimizers.

Backend-neutral (torch tensors or JAX arrays, through CoLA's ``xnp``); the torch optimizer
and the JAX gradient transformation differ only in how they keep this state.

A parameter with two or more axes is the ``m × n`` matrix ``G`` of
:func:`~cola_curvature.operators.symmetry.matrix_view` (a convolution kernel
``(m, c, h, w)`` is ``(m, c h w)``); its group's average of ``vec(G) vec(G)ᵀ`` comes from the
closed forms of :mod:`cola_curvature.operators.symmetry_blocks`, fed with the statistics
(``GᵀG``, ``GGᵀ``, ``‖G‖²``, ``(Gᵀ1)(Gᵀ1)ᵀ``) of :func:`gradient_statistics`. A parameter
with fewer axes (a bias, a norm scale) gets the diagonal ``diag(g ⊙ g)``: the average of
``g gᵀ`` over flipping the sign of each entry, Adam's (RMSprop's) curvature estimate.

The statistics are linear in ``g gᵀ``, so their moving average
``M_t = β M_{t−1} + (1 − β) stat(g_t)``, debiased by ``1 − β^t``, is the group average of
the moving average of ``g_t g_tᵀ``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cola.backends import get_library_fns

from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.kronecker_blocks import DiagonalBlock
from cola_curvature.operators.symmetry import matrix_view
from cola_curvature.operators.symmetry_blocks import averaged_block, gradient_statistics
from cola_curvature.optim._options import Grafting
from cola_curvature.options import SymmetryGroup
from cola_curvature.preconditioning import preconditioned_step
from cola_curvature.types import Array

#: A parameter's curvature structure: a symmetry group, or ``None`` for the diagonal.
Structure = SymmetryGroup | None


def structure_of(shape: Sequence[int], group: SymmetryGroup) -> Structure:
    """Return ``group`` for a parameter with two or more axes, ``None`` (diagonal) otherwise."""
    return group if len(shape) >= 2 else None


def parameter_statistics(structure: Structure, gradient: Array) -> tuple[Array, ...]:
    """Return the statistics of one gradient: the group's (of its matrix view), or ``(g ⊙ g,)``."""
    if structure is None:
        return (gradient.reshape(-1) ** 2,)
    return gradient_statistics(structure, matrix_view([gradient]))


def moving_average(
    average: Sequence[Array] | None, statistics: Sequence[Array], beta: float
) -> list[Array]:
    """Return ``β M + (1 − β) S`` entry by entry (``M = 0`` when ``average`` is ``None``)."""
    if average is None:
        return [(1 - beta) * s for s in statistics]
    return [beta * a + (1 - beta) * s for a, s in zip(average, statistics, strict=True)]


def debiased(average: Sequence[Array], count: Any, beta: float) -> list[Array]:
    """Return ``M_t / (1 − β^t)`` after ``t = count`` updates of the moving average."""
    return [a / (1 - beta**count) for a in average]


def parameter_curvature(
    structure: Structure, statistics: Sequence[Array], shape: Sequence[int]
) -> KroneckerFactored:
    """Return the curvature of one parameter (row-major ``vec``) as a one-block operator.

    The group's averaged block (:func:`averaged_block`) of the ``m × n`` matrix view, or
    ``diag(v)`` for the diagonal; its eigendecomposition is computed on first use and cached.
    """
    if structure is None:
        block = DiagonalBlock(statistics[0])
    else:
        rows = shape[0]
        block = averaged_block(structure, tuple(statistics), (rows, math.prod(shape) // rows))
    xnp = get_library_fns(statistics[0].dtype)
    positions = xnp.arange(block.shape[0], device=xnp.get_device(statistics[0]))
    return KroneckerFactored([block], positions)


def preconditioned_direction(
    curvature: KroneckerFactored, gradient: Array, damping: float, power: float
) -> Array:
    """Return ``(C + ε I)^p g`` shaped like ``g`` (:func:`preconditioned_step`)."""
    flat = preconditioned_step(curvature, gradient.reshape(-1), damping, power)
    return flat.reshape(gradient.shape)


def grafted(
    grafting: Grafting | None,
    direction: Array,
    gradient: Array,
    second_moment: Sequence[Array] | None,
    count: Any,
    beta: float,
    damping: float,
) -> tuple[Array, list[Array] | None]:
    """Return ``d`` rescaled to the grafted step size, and the new moving average of ``g ⊙ g``.

    ``"sgd"``: ``‖g‖``; ``"adam"``: ``‖g ⊙ (v̂ + ε)^{-1/2}‖`` with ``v̂`` the debiased moving
    average of ``g ⊙ g`` after ``count`` steps (``second_moment``, updated and returned; the
    others return it unchanged); ``None``: ``d`` itself. A zero ``d`` stays zero.
    """
    if grafting is None:
        return direction, second_moment
    if grafting is Grafting.SGD:
        norm = (gradient**2).sum() ** 0.5
    else:
        squares = parameter_statistics(None, gradient)
        second_moment = moving_average(second_moment, squares, beta)
        diagonal = parameter_curvature(None, debiased(second_moment, count, beta), gradient.shape)
        norm = (preconditioned_direction(diagonal, gradient, damping, -0.5) ** 2).sum() ** 0.5
    xnp = get_library_fns(direction.dtype)
    own = (direction**2).sum() ** 0.5
    return direction * xnp.where(own > 0, norm / xnp.where(own > 0, own, 1.0), 0.0), second_moment


def momentum_step(
    param: Array,
    direction: Array,
    buffer: Array | None,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> tuple[Array, Array | None]:
    """Return ``(lr (b + λ θ), b)`` with ``b = μ b + d`` (``b = d`` without momentum).

    The parameter moves to ``θ − lr (b + λ θ)``: heavy-ball momentum on the preconditioned
    direction and decoupled (AdamW-style) weight decay ``λ``.
    """
    if momentum > 0:
        buffer = direction if buffer is None else momentum * buffer + direction
        return lr * (buffer + weight_decay * param), buffer
    return lr * (direction + weight_decay * param), None


def apply_step(param: Array, direction: Array, state: dict, group: dict) -> None:
    """Move a torch parameter in place by :func:`momentum_step` with ``group``'s settings.

    ``state`` is the parameter's optimizer state; its ``"momentum_buffer"`` is kept there.
    """
    change, buffer = momentum_step(
        param,
        direction,
        state.get("momentum_buffer"),
        group["lr"],
        group["momentum"],
        group["weight_decay"],
    )
    if buffer is not None:
        state["momentum_buffer"] = buffer
    param.sub_(change)
