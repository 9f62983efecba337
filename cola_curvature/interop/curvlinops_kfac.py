"""KFAC factors to and from curvlinops' ``KFACLinearOperator`` (conventions: the package)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from cola_curvature.backends import curvature_backend
from cola_curvature.interop._layers import layer_groups, require
from cola_curvature.operators.kfac import KFAC
from cola_curvature.operators.kronecker_blocks import KroneckerBlock
from cola_curvature.operators.parameter_kronecker import ParameterKroneckerFactored
from cola_curvature.options import FisherType

#: The torch losses curvlinops' KFAC accepts.
CURVLINOPS_LOSSES = (torch.nn.MSELoss, torch.nn.CrossEntropyLoss, torch.nn.BCEWithLogitsLoss)


def to_curvlinops(
    kfac: KFAC,
    model: torch.nn.Module,
    loss_func: torch.nn.Module,
    params: Sequence[torch.Tensor],
    data: Iterable[tuple[Any, Any]],
    *,
    batch_size_fn: Any = None,
) -> Any:
    """Return a curvlinops ``KFACLinearOperator`` holding ``kfac``'s factors (copies).

    The operator is built lazily (curvlinops computes factors on the first product), with
    ``kfac``'s ``fisher_type``, ``kfac_approx``, number of examples and weight/bias
    layout, and its factor dictionaries are filled with ours, so no factor is recomputed:
    curvlinops reads ``data`` once, for its loss terms per example, and runs no model pass.
    Calling its ``compute_kronecker_factors`` would add its own estimate to them.

    Args:
        kfac: A torch :class:`~cola_curvature.KFAC` over ``Linear`` / ``Conv2d`` layers.
        model: The model ``kfac`` was built on.
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``, the
            loss (and reduction) ``kfac`` was built with.
        params: ``kfac``'s parameters, in its order.
        data: The data ``kfac`` was built on.
        batch_size_fn: ``X -> int`` for inputs that are not a single tensor.

    Raises:
        TypeError: ``kfac`` is not a torch KFAC with Kronecker factors, or ``loss_func`` is
            not one of curvlinops' losses or not ``kfac``'s.
        ValueError: ``params`` do not match, or a block is not of a Linear / Conv2d layer.
    """
    curvlinops = require("curvlinops")
    groups = layer_groups(kfac, "curvlinops")
    _check_same_loss(kfac, loss_func, params)
    separate = all("joint" not in blocks for _, blocks in groups)
    mc_samples = kfac._build_options["mc_samples"]
    operator = curvlinops.KFACLinearOperator(
        model,
        loss_func,
        list(params),
        data,
        check_deterministic=False,
        fisher_type=kfac.fisher_type.value,
        mc_samples=mc_samples if kfac.fisher_type is FisherType.MC else 1,
        kfac_approx=kfac.kfac_approx.value,
        separate_weight_and_bias=separate,
        num_data=kfac.num_data,
        batch_size_fn=batch_size_fn,
    )
    by_positions = {(group[0].weight_index, group[0].bias_index): group for group in groups}
    inputs, gradients = {}, {}
    for name, positions in operator._mapping.items():
        key = (positions.get("weight"), positions.get("bias"))
        if key not in by_positions:
            raise ValueError(
                f"curvlinops' layer {name!r} (params {key}) is not one of the KFAC's layers; "
                "pass the model, params and data the KFAC was built on."
            )
        gradient, input_factor = _curvlinops_factors(*by_positions[key])
        gradients[name] = gradient
        if input_factor is not None:
            inputs[name] = input_factor
    operator._input_covariances = inputs
    operator._gradient_covariances = gradients
    return operator


def from_curvlinops(operator: Any) -> ParameterKroneckerFactored:
    """Return a curvlinops ``KFACLinearOperator`` as our Kronecker-factored operator.

    The blocks are ``G ⊗ A`` per layer (joint: ``G ⊗ Ã`` on ``vec([W b])``; separate:
    ``G ⊗ A`` on ``vec(W)`` and ``G ⊗ [1]`` on ``b``) over copies of the operator's
    factors, computed first if it has none yet. The result takes ``(D,)``, ``(D, k)`` and
    parameter-shaped (list of tensors) input over the operator's parameters, and every
    Kronecker dispatch rule (inverse, logdet, damping) applies.

    Raises:
        TypeError: ``operator`` is not a curvlinops ``KFACLinearOperator`` (EKFAC's
            eigen-corrected operator has no Kronecker factors to copy).
    """
    curvlinops = require("curvlinops")
    if type(operator) is not curvlinops.KFACLinearOperator:
        raise TypeError(
            "operator must be a curvlinops KFACLinearOperator (not a subclass such as "
            f"EKFACLinearOperator), got {type(operator).__name__}."
        )
    if not (operator._input_covariances or operator._gradient_covariances):
        operator.compute_kronecker_factors()
    params = operator._params
    offsets = np.cumsum([0] + [p.numel() for p in params])
    blocks, parts = [], []
    for name, positions in operator._mapping.items():
        gradient = operator._gradient_covariances[name].detach().clone()
        input_factor = operator._input_covariances.get(name)
        weight, bias = positions.get("weight"), positions.get("bias")
        out = gradient.shape[0]
        one = gradient.new_ones((1, 1))
        if weight is not None and bias is not None and not operator._separate_weight_and_bias:
            blocks.append(KroneckerBlock(gradient, input_factor.detach().clone()))
            parts.append(_augmented_positions(offsets, weight, bias, out))
            continue
        if weight is not None:
            blocks.append(KroneckerBlock(gradient, input_factor.detach().clone()))
            parts.append(offsets[weight] + np.arange(params[weight].numel()))
        if bias is not None:
            blocks.append(KroneckerBlock(gradient, one))
            parts.append(offsets[bias] + np.arange(out))
    backend = curvature_backend(operator._model_func, operator._loss_func, params)
    permutation = torch.as_tensor(np.concatenate(parts), device=blocks[0].device)
    return ParameterKroneckerFactored(backend, blocks, permutation)


def _curvlinops_factors(
    layer: Any, blocks: dict[str, KroneckerBlock | None]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return curvlinops' ``(G, A)`` of one layer (``A`` is ``None`` for a bias alone).

    A bias block ``G ⊗ [a]`` gives ``a G``; a separated layer's two blocks must share ``G``.
    """
    if "joint" in blocks:
        joint = blocks["joint"]
        if layer.weight_index is None:
            return _clone(joint.input_factor[0, 0] * joint.output_factor), None
        return _clone(joint.output_factor), _clone(joint.input_factor)
    weight, bias = blocks["weight"], blocks["bias"]
    bias_gradient = None if bias is None else bias.input_factor[0, 0] * bias.output_factor
    if weight is None:
        return _clone(bias_gradient), None
    if bias_gradient is not None and not torch.allclose(
        bias_gradient, weight.output_factor, rtol=1e-12, atol=0.0
    ):
        raise ValueError(
            f"layer {layer.name!r}: its weight and bias blocks have different output factors; "
            "curvlinops holds one G per layer."
        )
    return _clone(weight.output_factor), _clone(weight.input_factor)


def _check_same_loss(kfac: KFAC, loss_func: Any, params: Sequence[torch.Tensor]) -> None:
    """Raise unless ``loss_func`` and ``params`` are the ones ``kfac`` was built with."""
    from cola_curvature.backends.torch.losses import as_loss

    if not isinstance(loss_func, CURVLINOPS_LOSSES):
        raise TypeError(
            "loss_func must be nn.MSELoss, nn.CrossEntropyLoss or nn.BCEWithLogitsLoss "
            f"(curvlinops' losses), got {type(loss_func).__name__}."
        )
    ours, theirs = kfac._backend.loss, as_loss(loss_func)
    if type(ours) is not type(theirs) or ours.reduction is not theirs.reduction:
        raise TypeError(
            f"loss_func is {type(theirs).__name__}({theirs.reduction.value!r}) but the KFAC was "
            f"built with {type(ours).__name__}({ours.reduction.value!r})."
        )
    sizes = [p.numel() for p in params]
    if sizes != list(kfac._backend.layout.sizes):
        raise ValueError(
            f"params have sizes {sizes} but the KFAC's have {list(kfac._backend.layout.sizes)}; "
            "pass the KFAC's params in its order."
        )


def _augmented_positions(offsets: np.ndarray, weight: int, bias: int, out: int) -> np.ndarray:
    """Return the ``params`` positions of the row-major ``vec([W b])`` of one layer."""
    columns = (offsets[weight + 1] - offsets[weight]) // out
    grid = offsets[weight] + np.arange(out * columns).reshape(out, columns)
    return np.concatenate([grid, offsets[bias] + np.arange(out)[:, None]], axis=1).reshape(-1)


def _clone(factor: torch.Tensor) -> torch.Tensor:
    """Return a detached copy (curvlinops adds to its factors in place)."""
    return factor.detach().clone()
