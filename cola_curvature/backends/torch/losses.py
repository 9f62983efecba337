"""Translation of ``torch.nn`` loss modules into :mod:`cola_curvature.losses` descriptors."""

from __future__ import annotations

from typing import Any

from torch import nn

from cola_curvature.losses import MSE, SUPPORTED_LOSSES, BCEWithLogits, CrossEntropy, Loss

_TRANSLATIONS: dict[type[nn.Module], type[Loss]] = {
    nn.MSELoss: MSE,
    nn.CrossEntropyLoss: CrossEntropy,
    nn.BCEWithLogitsLoss: BCEWithLogits,
}


def _reject_options(loss_func: nn.Module) -> None:
    """Raise for options of torch's losses that change the likelihood (weights, smoothing)."""
    unsupported = {
        "weight": getattr(loss_func, "weight", None) is not None,
        "pos_weight": getattr(loss_func, "pos_weight", None) is not None,
        "label_smoothing": getattr(loss_func, "label_smoothing", 0.0) != 0.0,
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

    Raises:
        TypeError: for any other loss, listing the supported ones.
        ValueError: for an unsupported reduction or option.

    """
    if isinstance(loss_func, Loss):
        return loss_func
    descriptor = _TRANSLATIONS.get(type(loss_func))
    if descriptor is None:
        names = [t.__name__ for t in _TRANSLATIONS] + [
            f"cola_curvature.losses.{t.__name__}" for t in SUPPORTED_LOSSES
        ]
        raise TypeError(
            f"Unsupported loss {type(loss_func).__name__}; expected one of {', '.join(names)}."
        )
    _reject_options(loss_func)
    return descriptor(reduction=loss_func.reduction)
