"""``J V`` of a functional torch model by forward mode, with its reverse-mode graph.

The first column rides as dual tensors on the forward pass that records the graph; the
other columns come from replays of that pass's tangent tape
(:mod:`~cola_curvature.backends.torch.tangent_tape`), batched in one ``vmap`` when the
tangents are small, or from their own dual passes; models without forward-mode AD get
``J V`` from reverse mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch.func import vmap

from cola_curvature.backends.torch.autodiff_routes import (
    ProductRoutes,
    lacks_forward_ad,
    logger,
    reverse_pushforwards,
)
from cola_curvature.backends.torch.tangent_tape import _TangentProgram, _TangentTape

#: ``(params, inputs) -> outputs`` with params in the operator's order.
ModelFn = Callable[[Sequence[torch.Tensor], object], torch.Tensor]


def _leaves(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Return fresh leaves that require grad, sharing memory with ``params``."""
    return [p.detach().requires_grad_(True) for p in params]


def _seed(param: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """Return a copy of ``column`` with the memory layout of ``param``.

    ``make_dual`` keeps such a tangent as it is (it copies one whose strides or offset
    differ), so the taped tangent is the very tensor passed in.
    """
    return torch.empty_like(param).copy_(column)


#: ``k`` columns are batched (one ``vmap`` replay, one batched backward pass) while the
#: largest tangent times ``k - 1`` stays below this many bytes: batching turns many small
#: matrix products into large ones (MLP 784-256-256-10 on 128 examples, 5.6 MiB: about
#: 10 % faster), but past a few MiB the copies that ``vmap``'s matrix-product rules make of
#: the batched tensors cost more than they save (small CNN on 3×32×32 images: slower;
#: transformer block on 128 × 16 tokens of width 64–256, 14 MiB: 2.65 vs 1.9 gradients
#: per column).
_BATCH_BYTES = 8 * 2**20


def _jvp_outputs(
    model_fn: ModelFn,
    primals: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor],
    inputs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(f(x), J v)`` from one forward pass with dual tensors."""
    with fwad.dual_level():
        duals = [fwad.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
        unpacked = fwad.unpack_dual(model_fn(duals, inputs))
        if unpacked.tangent is None:
            return unpacked.primal, torch.zeros_like(unpacked.primal)
        return unpacked.primal, unpacked.tangent


def _replay_batched(
    program: _TangentProgram, columns: Sequence[torch.Tensor]
) -> list[torch.Tensor] | None:
    """Return the replays for columns ``1, …, k-1`` in one ``vmap``, or ``None`` if it fails."""
    rest = [c[1:].contiguous() for c in columns]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's notes on batching rules it lacks
            return list(vmap(lambda *ts: program.replay(ts)[0])(*rest).unbind(0))
    except (RuntimeError, NotImplementedError):
        return None


def _replay_one_by_one(
    program: _TangentProgram, params: Sequence[torch.Tensor], columns: Sequence[torch.Tensor]
) -> list[torch.Tensor] | None:
    """Return the replays for columns ``1, …, k-1`` one at a time, or ``None`` if one fails."""
    try:
        return [
            program.replay([_seed(p, c[i]) for p, c in zip(params, columns, strict=True)])[0]
            for i in range(1, columns[0].shape[0])
        ]
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _pushforwards(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    columns: Sequence[torch.Tensor],
    inputs: object,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], bool]:
    """Return ``f(x)`` with its graph, the graph's leaves, ``J V`` by column and ``batched``.

    The first column rides as dual tensors on the forward pass that records the graph.
    For ``k > 1`` columns that pass is taped
    (:class:`~cola_curvature.backends.torch.tangent_tape._TangentTape`) and the tape is
    replayed for the others: in one ``vmap`` when the tangents are small
    (``batched=True``, see ``_BATCH_BYTES``), else one column at a time. If taping fails,
    each other column gets its own dual pass without a graph.
    """
    num_columns = columns[0].shape[0]
    leaves = _leaves(params)
    taping = num_columns > 1
    seeds = [_seed(p, c[0]) for p, c in zip(params, columns, strict=True)]
    program = None
    with fwad.dual_level():
        duals = [fwad.make_dual(p, t) for p, t in zip(leaves, seeds, strict=True)]
        taping = taping and all(
            fwad.unpack_dual(d).tangent is t for d, t in zip(duals, seeds, strict=True)
        )
        if taping:
            tape = _TangentTape(seeds)
            with tape:
                output = model_fn(duals, inputs)
        else:
            output = model_fn(duals, inputs)
        outputs, first = fwad.unpack_dual(output)
        if first is None:
            first = torch.zeros_like(outputs)
        elif taping:
            program = tape.program([first])
    batched = False
    with torch.no_grad():
        rest = None
        if (
            program is not None
            and num_columns > 2
            and program.largest_bytes * (num_columns - 1) <= _BATCH_BYTES
            and all(p.is_contiguous() for p in params)
        ):
            rest = _replay_batched(program, columns)
            batched = rest is not None
        if rest is None and program is not None:
            rest = _replay_one_by_one(program, params, columns)
        if rest is None:
            detached = [p.detach() for p in params]
            rest = [
                _jvp_outputs(model_fn, detached, [c[i] for c in columns], inputs)[1]
                for i in range(1, num_columns)
            ]
    return outputs, leaves, [first.detach(), *rest], batched


def _pushforwards_any_route(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    columns: Sequence[torch.Tensor],
    inputs: object,
    routes: ProductRoutes,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], bool]:
    """Return :func:`_pushforwards`, or the reverse-mode route where forward AD is missing.

    The first product on a model tries forward mode; if torch reports a missing forward
    derivative, ``routes`` remembers why and this and every later product take ``J V``
    from :func:`~cola_curvature.backends.torch.autodiff_routes.reverse_pushforwards`.
    """
    if routes.forward_ad_error is None:
        try:
            pushed = _pushforwards(model_fn, params, columns, inputs)
        except (NotImplementedError, RuntimeError) as error:
            if not lacks_forward_ad(error):
                raise
            routes.forward_ad_error = f"{type(error).__name__}: {error}"
        else:
            logger.debug("J V by forward mode (dual tensors), %d column(s)", columns[0].shape[0])
            return pushed
    why = f"forward-mode AD is unavailable ({routes.forward_ad_error})"
    logger.debug("J V by reverse mode (double vjp), since %s", why)
    return (*reverse_pushforwards(model_fn, params, columns, inputs, why), False)
