"""Translation of ``torch.nn`` loss modules into :mod:`cola_curvature.losses` descriptors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from cola_curvature.losses import (
    MSE,
    NLL,
    SUPPORTED_LOSSES,
    BCEWithLogits,
    CrossEntropy,
    Huber,
    Loss,
    PoissonNLL,
    SmoothL1,
)


def _poisson(loss_func: nn.PoissonNLLLoss) -> PoissonNLL:
    """Return :class:`PoissonNLL` for ``log_input=True``; refuse rates as outputs."""
    if not loss_func.log_input:
        raise ValueError(
            "PoissonNLLLoss(log_input=False) is not supported (its output Hessian y / f² "
            "depends on the targets and is not the Poisson Fisher); let the model output the "
            "log-rate and use log_input=True."
        )
    return PoissonNLL(full=loss_func.full, reduction=loss_func.reduction)


_TRANSLATIONS: dict[type[nn.Module], Callable[[Any], Loss]] = {
    nn.MSELoss: lambda loss: MSE(reduction=loss.reduction),
    nn.CrossEntropyLoss: lambda loss: CrossEntropy(
        reduction=loss.reduction, label_smoothing=loss.label_smoothing
    ),
    nn.BCEWithLogitsLoss: lambda loss: BCEWithLogits(reduction=loss.reduction),
    nn.NLLLoss: lambda loss: NLL(reduction=loss.reduction),
    nn.PoissonNLLLoss: _poisson,
    nn.HuberLoss: lambda loss: Huber(delta=loss.delta, reduction=loss.reduction),
    nn.SmoothL1Loss: lambda loss: SmoothL1(beta=loss.beta, reduction=loss.reduction),
}

_REFUSED = {
    nn.GaussianNLLLoss: (
        "GaussianNLLLoss takes its variance at call time, which a curvature operator does "
        "not pass; for a fixed variance use cola_curvature.losses.GaussianNLL(var=..., "
        "full=..., eps=..., reduction=...). A variance predicted by the model makes the "
        "output Hessian indefinite and is not supported."
    ),
}


def _reject_options(loss_func: nn.Module) -> None:
    """Raise for options of torch's losses that change the likelihood (weights, padding)."""
    unsupported = {
        "weight": getattr(loss_func, "weight", None) is not None,
        "pos_weight": getattr(loss_func, "pos_weight", None) is not None,
        "ignore_index": getattr(loss_func, "ignore_index", -100) != -100,
    }
    used = [name for name, is_set in unsupported.items() if is_set]
    if used:
        raise ValueError(
            f"{type(loss_func).__name__} with {', '.join(used)} is not supported; "
            "use the loss without these options."
        )


def as_loss(loss_func: Any) -> Loss:
    """Return the :class:`~cola_curvature.losses.Loss` for a torch loss module or descriptor.

    A plain function is refused: its reduction and ``"mean"`` divisor cannot be read off
    it, so it goes in as ``cola_curvature.losses.CallableLoss(fn, reduction=...)``.

    Raises:
        TypeError: for any other loss, listing the supported ones.
        ValueError: for an unsupported reduction or option.

    """
    if isinstance(loss_func, Loss):
        return loss_func
    if type(loss_func) in _REFUSED:
        raise TypeError(_REFUSED[type(loss_func)])
    translate = _TRANSLATIONS.get(type(loss_func))
    if translate is None:
        names = [t.__name__ for t in _TRANSLATIONS] + [
            f"cola_curvature.losses.{t.__name__}" for t in SUPPORTED_LOSSES
        ]
        raise TypeError(
            f"Unsupported loss {type(loss_func).__name__}; expected one of {', '.join(names)}. "
            "Wrap any other loss function as cola_curvature.losses.CallableLoss(fn, "
            "reduction=...) with fn(outputs, targets) returning the loss summed over the batch."
        )
    _reject_options(loss_func)
    return translate(loss_func)
