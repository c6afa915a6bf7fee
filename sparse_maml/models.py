"""Backbones: Conv4 and ResNet-12, plain nn.Modules with a `head` (the final nn.Linear), and
backbones of your own named as `module:Class` (checked against the same contract when built).

Adapted weights are applied with torch.func.functional_call, so the models hold no meta-learning
logic. Every BatchNorm uses batch statistics at training and test time (no running statistics),
as in MAML and the reference: that keeps a task's prediction a function of that task alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError

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
        blocks = zip((in_channels, *widths), widths)
        self.body = nn.Sequential(OrderedDict(
            (f"block{k}", ConvBlock(*block)) for k, block in enumerate(blocks, start=1)))
        side = image_size // 2 ** len(widths)
        if side < 1:
            raise ValueError(f"Conv4 needs images of at least 16 pixels, got {image_size}")
        self.feature_size = widths[-1] * side * side  # 64*5*5 = 1600 for 84x84 inputs
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
        out = F.leaky_relu(self.bn3(self.conv3(out)) + self.shortcut(x), LEAKY_SLOPE)
        if self.pool_padding is None:
            return out
        return F.max_pool2d(out, 2, stride=2, padding=self.pool_padding)


class ResNet12(nn.Module):
    """The reference's ResNet-12: 4 residual blocks, pooling 84->42->21->11, global average pool."""

    def __init__(self, in_channels: int, num_ways: int, image_size: int,
                 widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        # Pool padding 1 after block 3 (21 -> 11), no pool after block 4.
        blocks = zip((in_channels, *widths), widths, (0, 0, 1, None))
        self.body = nn.Sequential(OrderedDict(
            [(f"block{k}", ResidualBlock(*block)) for k, block in enumerate(blocks, start=1)]
            + [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]))
        self.feature_size = widths[-1]
        self.head = nn.Linear(self.feature_size, num_ways)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(self.head.bias)  # the only bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


MODELS = {"conv4": Conv4, "resnet12": ResNet12}


# The largest dense sparse-MAML+ generator built (weights): the paper's Conv4 needs 180M; this
# allows about 4 GiB in fp32 (three times that with Adam's state).
GENERATOR_MAX_WEIGHTS = 2**30


def build_model(arch: str, in_channels: int, num_ways: int, image_size: int,
                widths: tuple[int, ...]) -> nn.Module:
    """Instantiate a registered backbone, or a `module:Class` one, refused if it breaks the
    contract every adaptation rule relies on."""
    if ":" not in arch:
        if arch not in MODELS:
            raise ValueError(f"model.arch must be one of {sorted(MODELS)}, got {arch!r}")
        return MODELS[arch](in_channels, num_ways, image_size, tuple(widths))
    cls = load_backbone_class(arch)
    try:
        model = cls(in_channels=in_channels, num_ways=num_ways, image_size=image_size)
    except Exception as err:  # the user's constructor may raise anything
        raise ConfigError(f"model.arch={arch}: {cls.__name__}(in_channels={in_channels}, "
                          f"num_ways={num_ways}, image_size={image_size}) failed: "
                          f"{type(err).__name__}: {err}") from err
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"model.arch={arch}: the model needs a `head` attribute that is an "
                          f"nn.Linear (the classifier ANIL adapts and BOIL freezes), got "
                          f"{type(head).__name__}")
    if head.out_features != num_ways:
        raise ConfigError(f"model.arch={arch}: head has {head.out_features} outputs, but "
                          f"data.num_ways={num_ways}")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            # Running statistics would be buffers updated inside the inner loop (and under vmap).
            raise ConfigError(f"model.arch={arch}: BatchNorm {name} keeps running statistics; build "
                              "it with track_running_stats=False (sparse_maml.models.batch_norm)")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        # The inner loop runs the model on a dict of weights (functional_call, strict): all state
        # must be parameters.
        raise ConfigError(f"model.arch={arch}: the model holds buffers ({', '.join(buffers[:3])}); "
                          "keep constants as plain tensor attributes or parameters")
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, image_size, image_size))
    except Exception as err:
        raise ConfigError(f"model.arch={arch}: a forward pass on a (2, {in_channels}, {image_size}, "
                          f"{image_size}) batch failed: {type(err).__name__}: {err}") from err
    if not isinstance(out, torch.Tensor) or out.shape != (2, num_ways):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.arch={arch}: a (2, {in_channels}, {image_size}, {image_size}) "
                          f"batch must give (2, {num_ways}) logits, got {shape}")
    if not hasattr(model, "feature_size"):
        model.feature_size = head.in_features  # the features sparse-MAML+'s noise is sized by
    return model


def _import_file(path: Path) -> object:
    """Import a Python file as a module (once per resolved path)."""
    resolved = path.resolve()
    name = "sparse_maml_backbone_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before executing it, as `import` does (dataclasses need it)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_backbone_class(spec: str) -> type[nn.Module]:
    """The class named by `module:Class` (an importable module) or `path/to/file.py:Class`."""
    where, _, class_name = spec.rpartition(":")
    if not where or not class_name:
        raise ConfigError(f"model.arch={spec!r}: expected module:Class or path/to/file.py:Class")
    is_file = where.endswith(".py")
    try:
        if is_file and not Path(where).is_file():
            raise ConfigError(f"model.arch={spec}: file {Path(where).resolve()} does not exist")
        module = _import_file(Path(where)) if is_file else importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as err:  # ImportError, or whatever the module raises while it runs
        hint = "" if is_file else (" (is its folder on PYTHONPATH? or name the file: "
                                   "path/to/file.py:Class)")
        raise ConfigError(f"model.arch={spec}: importing {where} failed: {type(err).__name__}: "
                          f"{err}{hint}") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"model.arch={spec}: {where} has no {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"model.arch={spec}: {class_name} is not an nn.Module subclass")
    return cls


def generator_size(model: nn.Module) -> int:
    """Weights of a dense sparse-MAML+ generator: a linear layer from the features to one logit per
    conv weight (with biases), plus the noise scale and offset."""
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    return conv * (model.feature_size + 1) + 2 * model.feature_size


def check_generator(model: nn.Module, arch: str) -> None:
    """Refuse sparse-MAML+ where its generator cannot be shaped for the backbone."""
    if not conv_weight_names(model):
        raise ConfigError(f"inner.mask_generator: model.arch={arch} has no nn.Conv2d layer, and "
                          "sparse-MAML+'s generator draws masks for conv weights only; set "
                          "inner.mask_generator=false")
    size = generator_size(model)
    if size > GENERATOR_MAX_WEIGHTS:
        raise ConfigError(f"inner.mask_generator with model.arch={arch} is refused: a dense generator "
                          f"would need {size:,} weights ({size * 4 / 2**30:.1f} GiB in fp32), more "
                          f"than {GENERATOR_MAX_WEIGHTS:,}")


def conv_weight_names(model: nn.Module) -> list[str]:
    """Names of the weights of every nn.Conv2d, in module order."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
