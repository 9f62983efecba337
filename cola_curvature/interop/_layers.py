"""What the conversions share: the layers whose blocks travel, and optional imports."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from cola_curvature.operators.kfac import KFAC
from cola_curvature.operators.kronecker_blocks import KroneckerBlock

#: Layer kinds whose blocks curvlinops and laplace-torch can hold.
SUPPORTED_KINDS = ("linear", "conv2d")


def layer_groups(kfac: Any, target: str) -> list[tuple[Any, dict[str, Any]]]:
    """Return ``(layer, blocks by role)`` of a torch KFAC whose blocks can travel to ``target``."""
    if not isinstance(kfac, KFAC):
        raise TypeError(
            f"kfac must be a cola_curvature.KFAC (its layers name the blocks), got "
            f"{type(kfac).__name__}."
        )
    if not isinstance(kfac.permutation, torch.Tensor):
        raise TypeError(f"{target} is a torch library; kfac must be built on a torch model.")
    covered = {layer.weight_index for layer in kfac.layers} | {
        layer.bias_index for layer in kfac.layers
    }
    names = kfac._backend.layout.names
    missing = [names[i] for i in range(len(names)) if i not in covered]
    if missing:
        raise ValueError(
            f"params {missing} have no Kronecker layer (the KFAC's uncovered block); {target} "
            "holds only Linear / Conv2d layers: leave them out of params."
        )
    groups = list(zip(kfac.layers, kfac.layer_blocks(), strict=True))
    for layer, blocks in groups:
        if layer.kind not in SUPPORTED_KINDS:
            raise ValueError(
                f"layer {layer.name!r} is a {layer.kind!r} layer; {target} holds only "
                f"{' and '.join(SUPPORTED_KINDS)} layers: leave its parameters out of params."
            )
        if not all(isinstance(b, KroneckerBlock) for b in blocks.values() if b is not None):
            raise TypeError(
                f"layer {layer.name!r} has a block without Kronecker factors (EKFAC's "
                f"eigen-corrected blocks); only KFAC's G ⊗ A blocks travel to {target}."
            )
    return groups


def require(module: str) -> Any:
    """Import an optional library, or raise ``ImportError`` naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = {"curvlinops": "curvlinops-for-pytorch"}.get(module, "laplace-torch")
        raise ImportError(f"this conversion needs {package}: pip install {package}") from error
