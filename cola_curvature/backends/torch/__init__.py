"""The PyTorch backend; importing it registers it for ``torch.nn.Module`` models."""

from __future__ import annotations

from typing import Any

from torch import nn

from cola_curvature.backends import curvature_backend, dispatch
from cola_curvature.backends.torch.backend import TorchBackend


@dispatch
def curvature_backend(model: nn.Module, loss_func: Any, params: Any) -> TorchBackend:  # noqa: F811
    """Return the torch backend for an ``nn.Module``."""
    return TorchBackend(model, loss_func, params)


__all__ = ["TorchBackend", "curvature_backend"]
