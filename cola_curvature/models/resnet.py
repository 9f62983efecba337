"""A torchvision-free ResNet (He et al., 2016, arXiv:1512.03385): 18 and 50 layouts, BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Blocks per stage of the standard layouts.
LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm, plus the (projected) input."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(in_channels, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand by 4, each with BatchNorm, plus the input."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(in_channels, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the bottleneck output plus the (projected) input, through a ReLU."""
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Return the identity, or a strided 1×1 convolution with BatchNorm where shapes change."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class ResNet(nn.Module):
    """Stem, stages of residual blocks (width doubling, stride 2 from the second), pool, fc.

    Args:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50).
        stages: Blocks per stage, e.g. ``(2, 2, 2, 2)``.
        num_classes: Outputs of the final ``Linear``.
        width: Channels of the first stage (64 in the standard layouts).
        in_channels: Image channels.
        small_input: A 3×3 stride-1 stem without max-pooling (CIFAR-style, for small images)
            instead of the 7×7 stride-2 stem and 3×3 max-pool of ImageNet models.
    """

    def __init__(
        self,
        block: str,
        stages: Sequence[int],
        num_classes: int = 1000,
        width: int = 64,
        in_channels: int = 3,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}.")
        kind = BasicBlock if block == "basic" else Bottleneck
        if small_input:
            stem = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)]
            stem.append(nn.ReLU())
        else:
            stem = [nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)]
            stem += [nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        self.stem = nn.Sequential(*stem)
        layers, channels = [], width
        for index, count in enumerate(stages):
            stage_width = width * 2**index
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                layers.append(kind(channels, stage_width, stride))
                channels = stage_width * kind.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(N, num_classes)`` for images ``(N, C, H, W)``."""
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet(depth: int = 18, **options: object) -> ResNet:
    """Return a ResNet of a standard ``depth`` (18, 34 or 50); ``options`` go to :class:`ResNet`."""
    if depth not in LAYOUTS:
        raise ValueError(f"depth must be one of {sorted(LAYOUTS)}, got {depth}.")
    block, stages = LAYOUTS[depth]
    return ResNet(block, stages, **options)
