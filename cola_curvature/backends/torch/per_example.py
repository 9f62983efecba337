"""Per-example gradients of output-space cotangents: ``vmap`` over examples, or a loop."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from cola_curvature.backends.torch.autodiff_routes import logger
from cola_curvature.kfac_statistics.chunking import gradient_chunks

ModelFn = Callable[[Sequence[torch.Tensor], object], torch.Tensor]


def _vmapped(
    model_fn: ModelFn, params: Sequence[torch.Tensor], inputs: object, cotangents: torch.Tensor
) -> torch.Tensor:
    """Return ``J_nᵀ u_{c,n}``, shape ``(C', N, D)``, by ``vmap`` over columns and examples."""
    detached = [p.detach() for p in params]

    def projected_output(ps: Sequence[torch.Tensor], x: object, u: torch.Tensor) -> torch.Tensor:
        return (model_fn(ps, tree_map(lambda t: t[None], x))[0] * u).sum()

    def flat_gradient(x: object, u: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.flatten() for g in grad(projected_output)(detached, x, u)])

    per_column = vmap(vmap(flat_gradient, in_dims=(0, 0)), in_dims=(None, 0))
    return per_column(inputs, cotangents)


def _looped(
    model_fn: ModelFn, params: Sequence[torch.Tensor], inputs: object, cotangents: torch.Tensor
) -> torch.Tensor:
    """Return ``J_nᵀ u_{c,n}``, ``(C', N, D)``: per example one forward, ``C'`` backward passes."""
    num_columns, num_examples = cotangents.shape[:2]
    rows = []
    for n in range(num_examples):
        leaves = [p.detach().requires_grad_(True) for p in params]
        output = model_fn(leaves, tree_map(lambda t, n=n: t[n : n + 1], inputs))
        columns = []
        for c in range(num_columns):
            if output.requires_grad:
                grads = torch.autograd.grad(
                    output,
                    leaves,
                    cotangents[c, n : n + 1],
                    retain_graph=c < num_columns - 1,
                    allow_unused=True,
                    materialize_grads=True,
                )
            else:
                grads = [torch.zeros_like(p) for p in params]
            columns.append(torch.cat([g.flatten() for g in grads]))
        rows.append(torch.stack(columns))
    return torch.stack(rows, dim=1)


def per_example_cotangent_gradients(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    inputs: object,
    cotangents: torch.Tensor,
) -> torch.Tensor:
    """Return ``J_nᵀ u_{c,n}`` for every column ``c`` and example ``n``, shape ``(C', N, D)``.

    ``cotangents`` has shape ``(C', *f.shape)``. Each example runs through the model alone
    (``vmap`` over examples, so models must not mix examples, e.g. no train-mode batch
    norm), one reverse pass per column. Cost: ``C'`` gradients' worth of per-example work.
    Models that ``vmap`` cannot run (custom ``autograd.Function``s without ``setup_context``
    and a vmap rule, data-dependent control flow) loop over examples instead: ``N`` forward
    and ``N C'`` backward passes, the same numbers, logged at ``DEBUG``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's notes on batching rules it lacks
            gradients = _vmapped(model_fn, params, inputs, cotangents)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError) as error:
        logger.debug("per-example gradients by a loop over examples: vmap failed (%s)", error)
        return _looped(model_fn, params, inputs, cotangents)
    logger.debug("per-example gradients by vmap over examples")
    return gradients


def summed_squared_gradients(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    inputs: object,
    cotangents: torch.Tensor,
) -> torch.Tensor:
    """Return ``Σ_{c,n} (J_nᵀ u_{c,n})²``, shape ``(D,)``, from chunks of per-example gradients.

    The gradients of :func:`per_example_cotangent_gradients` are computed
    :func:`~cola_curvature.kfac_statistics.chunking.gradient_chunks` columns × examples at a
    time and squared into the sum, so memory is one chunk (at most 64 MiB of gradients), not
    ``C' · N · D`` numbers; each gradient is still computed once.
    """
    num_columns, num_examples = cotangents.shape[:2]
    dimension = sum(p.numel() for p in params)
    chunks = gradient_chunks(num_columns, num_examples, dimension, cotangents.element_size())
    total = cotangents.new_zeros(dimension)
    for start in range(0, num_examples, chunks.examples):
        stop = start + chunks.examples
        examples = tree_map(lambda t, start=start, stop=stop: t[start:stop], inputs)
        for first in range(0, num_columns, chunks.columns):
            columns = cotangents[first : first + chunks.columns, start:stop]
            gradients = per_example_cotangent_gradients(model_fn, params, examples, columns)
            total += (gradients**2).sum((0, 1))
    return total
