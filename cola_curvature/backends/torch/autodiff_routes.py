"""Reverse-mode routes for models without forward-mode AD, and how a product picks its route.

Custom ``torch.autograd.Function``s without a ``jvp`` (and the few torch operations without
a forward derivative) make a dual forward pass raise. Gauss-Newton-type products then take
``J V`` from reverse mode by the double-vjp trick: ``u ↦ Jᵀu`` is linear in the output
cotangent ``u``, so ``J v = ∇_u ⟨Jᵀu, v⟩`` (one backward pass with ``create_graph`` and one
more per column). Every route a product takes is logged at ``DEBUG`` on the
``cola_curvature`` logger tree; a model that supports no exact route gets a
``NotImplementedError`` that names the offending ``Function``, never a different matrix.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import BackwardCFunction, Function, once_differentiable

#: The logger every route choice of the torch backend goes to (at ``DEBUG``).
logger = logging.getLogger("cola_curvature.backends.torch")

#: Messages torch raises when an operation or ``Function`` has no forward derivative.
_NO_FORWARD_AD = re.compile(r"forward[- ]?(mode )?AD|\bjvp\b", re.IGNORECASE)

#: How errors name the product of the Gauss-Newton-type operators that failed.
_JV = "J V (in GGN, Fisher and empirical Fisher products)"

#: The code object of every backward wrapped by ``@once_differentiable``.
_ONCE_DIFFERENTIABLE_CODE = once_differentiable(lambda ctx: None).__code__


@dataclass
class ProductRoutes:
    """What the first products learnt about a model, so later ones skip failing routes.

    Attributes:
        forward_ad_error: Why a dual forward pass failed (``None``: it has not failed).

    """

    forward_ad_error: str | None = None


def lacks_forward_ad(error: BaseException) -> bool:
    """Return whether ``error`` is torch's report of a missing forward derivative."""
    return (
        isinstance(error, (NotImplementedError, RuntimeError))
        and not isinstance(error, torch.OutOfMemoryError)
        and _NO_FORWARD_AD.search(str(error)) is not None
    )


def custom_functions(root: Any) -> list[type]:
    """Return the custom ``autograd.Function`` classes in the graph below ``root``."""
    seen, found = set(), {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, BackwardCFunction):
            found[node._forward_cls] = None
        stack.extend(child for child, _ in node.next_functions)
    return list(found)


def _backward_of(cls: type) -> Callable:
    """Return the method autograd calls to differentiate ``cls`` (``backward`` or ``vjp``)."""
    return cls.vjp if cls.vjp is not Function.vjp else cls.backward


def check_twice_differentiable(classes: Sequence[type], product: str, why: str) -> None:
    """Raise ``NotImplementedError`` if one of ``classes`` has a ``@once_differentiable`` backward.

    Differentiating such a backward either raises inside torch or, when its incoming
    gradients carry no graph, silently drops its second-order terms; the reverse-mode
    routes need it differentiable, so refuse up front.
    """
    once = [
        c.__qualname__
        for c in classes
        if getattr(_backward_of(c), "__code__", None) is _ONCE_DIFFERENTIABLE_CODE
    ]
    if once:
        raise NotImplementedError(
            f"{product} cannot be computed exactly: {why}, and the reverse-mode route needs "
            f"a differentiable backward, but {', '.join(once)} marks its backward "
            "@once_differentiable. Implement a jvp staticmethod (with setup_context) for it, "
            "or write its backward in differentiable torch operations without "
            "@once_differentiable."
        )


def no_route_error(product: str, forward: str, reverse: BaseException) -> NotImplementedError:
    """Return the error for a model on which neither forward nor reverse route works."""
    return NotImplementedError(
        f"{product} cannot be computed exactly: forward-mode AD is unavailable ({forward}) "
        f"and the reverse-mode route failed ({type(reverse).__name__}: {reverse}). Give the "
        "operation or custom autograd.Function a jvp, or a backward written in "
        "differentiable torch operations."
    )


def reverse_pushforwards(
    model_fn: Callable[[Sequence[torch.Tensor], object], torch.Tensor],
    params: Sequence[torch.Tensor],
    columns: Sequence[torch.Tensor],
    inputs: object,
    why: str,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Return ``f(x)`` with its graph, the graph's leaves and ``J V`` column by column.

    ``J v = ∇_u ⟨Jᵀu, v⟩`` at ``u = 0``: one forward pass, one backward pass for ``Jᵀu``
    that records its own graph (linear in ``u``), then one backward pass through it per
    column. The graph of ``f`` is kept for the ``Jᵀ (M J V)`` that follows. Cost: about one
    gradient plus one backward pass per column more than the forward-mode route.

    Raises:
        NotImplementedError: when a custom ``Function`` in the graph has a
            ``@once_differentiable`` backward, or the double backward fails.

    """
    num_columns = columns[0].shape[0]
    leaves = [p.detach().requires_grad_(True) for p in params]
    outputs = model_fn(leaves, inputs)
    zeros = [torch.zeros_like(outputs.detach()) for _ in range(num_columns)]
    if not outputs.requires_grad:
        return outputs, leaves, zeros
    check_twice_differentiable(custom_functions(outputs.grad_fn), _JV, why)
    cotangent = torch.zeros_like(outputs, requires_grad=True)
    pulled = torch.autograd.grad(outputs, leaves, cotangent, create_graph=True, allow_unused=True)
    used = [j for j, g in enumerate(pulled) if g is not None and g.requires_grad]
    if not used:
        return outputs, leaves, zeros
    try:
        tangents = [
            torch.autograd.grad(
                [pulled[j] for j in used],
                cotangent,
                [columns[j][i] for j in used],
                retain_graph=i < num_columns - 1,
                allow_unused=True,
            )[0]
            for i in range(num_columns)
        ]
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError) as error:
        raise no_route_error(_JV, why, error) from error
    return (
        outputs,
        leaves,
        [zero if t is None else t for t, zero in zip(tangents, zeros, strict=True)],
    )
