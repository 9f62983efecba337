"""Jacobian and Hessian products of a functional torch model from forward and reverse mode.

``J v`` comes from dual tensors (``torch.autograd.forward_ad``) in the same forward pass
that records the reverse-mode graph, so a GGN-vector product is one such pass plus one
backward pass: about 1.5 gradients on a small CNN on CPU, against about 2.2 for a
separate ``torch.func.jvp`` and ``torch.func.vjp``. For more columns the operations that
touch the first column's tangents are taped (below autograd, by a ``TorchDispatchMode``)
and the tape is replayed for the other columns, so the primal forward pass, which a
fresh dual pass would repeat, runs once per batch: 8 columns cost about 1.0 gradient per
column on that CNN instead of 1.6. Hessian products are reverse over reverse (double
backward): as fast as forward over reverse for one column on the CNN, about 1.5 times
faster on an MLP, and 1.6 times (CNN) to 2.5 times (MLP) faster per column for 8
columns, since the gradient's graph is built once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwad

from cola_curvature.backends.torch.autodiff_routes import (
    ProductRoutes,
    check_twice_differentiable,
    custom_functions,
    lacks_forward_ad,
    logger,
    no_route_error,
)
from cola_curvature.backends.torch.pushforwards import ModelFn, _leaves, _pushforwards_any_route


def _zeros_like_columns(columns: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Return zero products shaped like ``columns``."""
    return [torch.zeros_like(c) for c in columns]


def _stack_results(
    results: Sequence[Sequence[torch.Tensor | None]], params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Return per-parameter ``(k, *p.shape)`` products from ``k`` per-column results.

    ``None`` (a parameter the output does not depend on) becomes zeros; one column is a
    view (``unsqueeze``), not a copy.
    """
    if len(results) == 1:
        return [
            torch.zeros_like(p)[None] if r is None else r[None]
            for r, p in zip(results[0], params, strict=True)
        ]
    return [
        torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in results])
        for j, p in enumerate(params)
    ]


#: How errors name the Hessian's product.
_HV = "H V (in Hessian products)"


def gauss_newton_matmat(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    columns: Sequence[torch.Tensor],
    inputs: object,
    targets: torch.Tensor,
    output_matmat: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    routes: ProductRoutes | None = None,
) -> list[torch.Tensor]:
    """Return ``Jᵀ M J V`` for ``k`` columns ``V`` (entries of shape ``(k, *p.shape)``).

    ``J V`` comes from one forward pass with dual tensors that also records the
    reverse-mode graph, plus, for ``k > 1``, replays of the taped tangent operations (see
    :func:`~cola_curvature.backends.torch.pushforwards._pushforwards`). ``M`` is applied
    once to all ``k`` columns of ``J V`` (so a sampled ``M`` is the same matrix for every
    column), then ``k`` backward passes through the one graph give ``Jᵀ (M J V)``. Cost:
    one dual forward pass, ``k - 1`` tangent-only forward passes and ``k`` backward
    passes. Models without forward-mode AD get ``J V`` from reverse mode instead (see
    :func:`~cola_curvature.backends.torch.pushforwards._pushforwards_any_route`; ``routes``
    carries what earlier products on the same model learnt).
    """
    outputs, leaves, tangents, batched = _pushforwards_any_route(
        model_fn, params, columns, inputs, ProductRoutes() if routes is None else routes
    )
    output_columns = output_matmat(outputs.detach(), targets, torch.stack(tangents))
    del tangents
    return _pullbacks(outputs, leaves, params, output_columns, batched)


def _pullbacks(
    outputs: torch.Tensor,
    leaves: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    output_columns: torch.Tensor,
    batched: bool,
) -> list[torch.Tensor]:
    """Return ``Jᵀ U`` through the graph of ``outputs`` for ``U`` of shape ``(k, *f.shape)``.

    One backward pass per column, or (``batched``) first one batched backward pass
    (``is_grads_batched``), falling back to the column-by-column passes if it fails.
    Entries of the result have shape ``(k, *p.shape)``.
    """
    num_columns = output_columns.shape[0]
    if not outputs.requires_grad:
        return [p.new_zeros((num_columns, *p.shape)) for p in params]
    if batched:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grads = torch.autograd.grad(
                    outputs,
                    leaves,
                    output_columns,
                    retain_graph=True,  # for the column-by-column fallback below
                    allow_unused=True,
                    is_grads_batched=True,
                )
            return [
                p.new_zeros((num_columns, *p.shape)) if g is None else g
                for g, p in zip(grads, params, strict=True)
            ]
        except (RuntimeError, NotImplementedError):
            pass
    results = [
        torch.autograd.grad(
            outputs, leaves, output_columns[i], retain_graph=i < num_columns - 1, allow_unused=True
        )
        for i in range(num_columns)
    ]
    return _stack_results(results, params)


def output_jvp(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    columns: Sequence[torch.Tensor],
    inputs: object,
    routes: ProductRoutes | None = None,
) -> torch.Tensor:
    """Return ``J V`` of shape ``(k, *f.shape)`` for ``k`` columns ``V``.

    The route of :func:`gauss_newton_matmat`: one forward pass with dual tensors and, for
    ``k > 1``, replays of the taped tangent operations, or reverse mode where forward AD is
    missing (:func:`~cola_curvature.backends.torch.pushforwards._pushforwards_any_route`).
    The reverse-mode graph that pass records is dropped on return.
    """
    _, _, tangents, _ = _pushforwards_any_route(
        model_fn, params, columns, inputs, ProductRoutes() if routes is None else routes
    )
    return torch.stack(tangents)


def output_vjp(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    cotangents: torch.Tensor,
    inputs: object,
) -> list[torch.Tensor]:
    """Return ``Jᵀ U`` for ``k`` output cotangents ``U`` of shape ``(k, *f.shape)``.

    One forward pass that records the graph, one backward pass per column; entries of
    the result have shape ``(k, *p.shape)``.
    """
    leaves = _leaves(params)
    outputs = model_fn(leaves, inputs)
    return _pullbacks(outputs, leaves, params, cotangents, batched=False)


def _hessian_matmat_forward_over_reverse(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    columns: Sequence[torch.Tensor],
    inputs: object,
    targets: torch.Tensor,
    risk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """Return ``∇²_θ risk · V`` column by column, forward over reverse.

    Each column is one forward pass with dual tensors and one backward pass whose
    operations carry the tangent, so the tangent of the gradient is ``H v``. Used for
    graphs with custom ``autograd.Function`` nodes and ops without double backward.
    """
    num_columns = columns[0].shape[0]
    products = []
    for i in range(num_columns):
        leaves = _leaves(params)
        with fwad.dual_level():
            duals = [fwad.make_dual(p, c[i]) for p, c in zip(leaves, columns, strict=True)]
            value = risk(model_fn(duals, inputs), targets)
            if not value.requires_grad:
                products.append([torch.zeros_like(p) for p in params])
                continue
            grads = torch.autograd.grad(value, duals, allow_unused=True)
            products.append(
                [
                    torch.zeros_like(p)
                    if g is None or fwad.unpack_dual(g).tangent is None
                    else fwad.unpack_dual(g).tangent
                    for g, p in zip(grads, params, strict=True)
                ]
            )
    return _stack_results(products, params)


def gradient(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    inputs: object,
    targets: torch.Tensor,
    risk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """Return ``∇_θ risk(f_θ(x), y)``: one forward and one backward pass."""
    leaves = _leaves(params)
    value = risk(model_fn(leaves, inputs), targets)
    if not value.requires_grad:
        return [torch.zeros_like(p) for p in params]
    return list(torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True))


def _double_backward(
    grads: Sequence[torch.Tensor | None],
    leaves: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    columns: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Return ``∇_θ ⟨g(θ), v⟩`` for every column ``v``, one backward pass through ``g`` each."""
    num_columns = columns[0].shape[0]
    used = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
    if not used:
        return _zeros_like_columns(columns)
    results = [
        torch.autograd.grad(
            [grads[j] for j in used],
            leaves,
            [columns[j][i] for j in used],
            retain_graph=i < num_columns - 1,
            allow_unused=True,
        )
        for i in range(num_columns)
    ]
    return _stack_results(results, params)


def hessian_matmat(
    model_fn: ModelFn,
    params: Sequence[torch.Tensor],
    columns: Sequence[torch.Tensor],
    inputs: object,
    targets: torch.Tensor,
    risk: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    routes: ProductRoutes | None = None,
) -> list[torch.Tensor]:
    """Return ``∇²_θ risk(f_θ(x), y) · V``, reverse over reverse.

    One forward pass and one backward pass that records its own graph give the gradient
    ``g(θ)`` as a differentiable function; each column is then one backward pass through
    that graph, ``H v = ∇_θ ⟨g(θ), v⟩``. Cost on CPU: about 2.4 (small CNN) to 3 (MLP)
    gradients for one column, 1.5–2 per column for several.

    Other routes, each logged at ``DEBUG``: a graph with a custom ``autograd.Function`` goes
    forward over reverse (about 2.4–4.5 gradients per column), since double backward through
    a ``@once_differentiable`` backward silently drops terms; if that ``Function`` has no
    ``jvp``, reverse over reverse after all, unless its backward is
    ``@once_differentiable`` (then ``NotImplementedError``). An operation without double
    backward also goes forward over reverse. ``routes`` remembers a failed forward mode.
    """
    routes = ProductRoutes() if routes is None else routes
    leaves = _leaves(params)
    value = risk(model_fn(leaves, inputs), targets)
    if not value.requires_grad:
        return _zeros_like_columns(columns)
    custom = custom_functions(value.grad_fn)
    if custom and routes.forward_ad_error is None:
        del value
        try:
            product = _hessian_matmat_forward_over_reverse(
                model_fn, params, columns, inputs, targets, risk
            )
        except (NotImplementedError, RuntimeError) as error:
            if not lacks_forward_ad(error):
                raise
            routes.forward_ad_error = f"{type(error).__name__}: {error}"
        else:
            logger.debug("H V forward over reverse: the graph has custom autograd.Functions")
            return product
        value = risk(model_fn(leaves, inputs), targets)
    if custom:
        why = f"forward-mode AD is unavailable ({routes.forward_ad_error})"
        check_twice_differentiable(custom, _HV, why)
    grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
    try:
        product = _double_backward(grads, leaves, params, columns)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError) as error:  # an operation without double backward
        del grads
        if routes.forward_ad_error is not None:
            raise no_route_error(_HV, routes.forward_ad_error, error) from error
        logger.debug("H V forward over reverse: double backward failed (%s)", error)
        try:
            return _hessian_matmat_forward_over_reverse(
                model_fn, params, columns, inputs, targets, risk
            )
        except (NotImplementedError, RuntimeError) as forward_error:
            if not lacks_forward_ad(forward_error):
                raise
            routes.forward_ad_error = f"{type(forward_error).__name__}: {forward_error}"
            raise no_route_error(_HV, routes.forward_ad_error, error) from forward_error
    logger.debug("H V reverse over reverse (double backward)")
    return product
