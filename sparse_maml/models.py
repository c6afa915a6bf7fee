"""Backbones: Conv4 and ResNet-12, plain nn.Modules with a `head` (the final nn.Linear).

Adapted weights are applied with torch.func.functional_call, so the models hold no meta-learning
logic. Every BatchNorm uses batch statistics at training and test time (no running statistics),
as in MAML and the reference: that keeps a task's prediction a function of that task alone.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

LEAKY_SLOPE = 0.01  # ResNet-12 LeakyReLU negative slope (PyTorch default, as in the reference)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm that always normalises with the statistics of the current batch."""
    return nn.BatchNorm2d(channels, track_running_stats=False)


class ConvBlock(nn.Module):
    """3x3 conv (with bias) -> BatchNorm -> ReLU -> 2x2 max-pool."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norm = batch_norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)


class Conv4(nn.Module):
    """4 conv blocks (body), then a linear head on the flattened features."""

    def __init__(self, in_channels: int, num_ways: int, image_size: int,
                 widths: tuple[int, ...] = (64, 64, 64, 64)):
        super().__init__()
        blocks, channels = {}, in_channels
        for i, width in enumerate(widths, start=1):
            blocks[f"block{i}"] = ConvBlock(channels, width)
            channels = width
        self.body = nn.Sequential(OrderedDict(blocks))
        side = image_size
        for _ in widths:
            side //= 2
        if side < 1:
            raise ValueError(f"Conv4 needs images of at least 16 pixels, got {image_size}")
        self.feature_size = channels * side * side  # 64*5*5 = 1600 for 84x84 inputs
        self.head = nn.Linear(self.feature_size, num_ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


class ResidualBlock(nn.Module):
    """3 x [3x3 conv (no bias) -> BatchNorm -> LeakyReLU], a 1x1 conv + BatchNorm shortcut, pooling."""

    def __init__(self, in_channels: int, channels: int, pool_padding: int | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn1 = batch_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = batch_norm(channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = batch_norm(channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False),
                                      batch_norm(channels))
        self.pool_padding = pool_padding  # None: no pooling after this block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), LEAKY_SLOPE)
        out = F.leaky_relu(self.bn2(self.conv2(out)), LEAKY_SLOPE)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut(x), LEAKY_SLOPE)
        if self.pool_padding is not None:
            out = F.max_pool2d(out, 2, stride=2, padding=self.pool_padding)
        return out


class ResNet12(nn.Module):
    """The reference's ResNet-12: 4 residual blocks, pooling 84->42->21->11, global average pool."""

    def __init__(self, in_channels: int, num_ways: int, image_size: int,
                 widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        pool_paddings = (0, 0, 1, None)  # padding 1 after block 3 (21 -> 11), no pool after block 4
        blocks, channels = [], in_channels
        for width, padding in zip(widths, pool_paddings):
            blocks.append(ResidualBlock(channels, width, padding))
            channels = width
        self.body = nn.Sequential(OrderedDict(
            [(f"block{i}", b) for i, b in enumerate(blocks, start=1)]
            + [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]))
        self.feature_size = channels
        self.head = nn.Linear(channels, num_ways)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


MODELS = {"conv4": Conv4, "resnet12": ResNet12}


def build_model(arch: str, in_channels: int, num_ways: int, image_size: int,
                widths: tuple[int, ...]) -> nn.Module:
    """Instantiate a registered backbone."""
    if arch not in MODELS:
        raise ValueError(f"model.arch must be one of {sorted(MODELS)}, got {arch!r}")
    return MODELS[arch](in_channels, num_ways, image_size, tuple(widths))


def conv_weight_names(model: nn.Module) -> list[str]:
    """Names of the weights of every nn.Conv2d, in module order."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def generator_size_resnet12(widths: tuple[int, ...]) -> int:
    """Weights of a dense sparse-MAML+ generator for ResNet-12: features x (conv weights + 1)."""
    with torch.device("meta"):
        model = ResNet12(3, 5, 84, widths)
    params = dict(model.named_parameters())
    conv = sum(params[n].numel() for n in conv_weight_names(model))
    return model.feature_size * (conv + 1) + 2 * model.feature_size
