"""uint8 images to normalised float tensors, with optional train augmentation.

Every random choice takes an explicit torch.Generator, so an episode depends only on its own seed
and not on the process or worker that builds it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

# ImageNet statistics, used by the reference for MiniImageNet (and here for every colour dataset).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENT_PADDING = 8  # random crop with this much zero padding (reference: RandomCrop(84, padding=8))
AUGMENT_JITTER = 0.4  # brightness, contrast and saturation factors drawn from [1-0.4, 1+0.4]


class EpisodeTransform:
    """Resize to `size`, scale to [0, 1], optionally augment, optionally normalise."""

    def __init__(self, size: int, channels: int, normalize: bool, augment: bool,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.size, self.channels, self.augment = size, channels, augment
        self.normalize = normalize and channels == len(mean)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def apply(self, image: torch.Tensor, params: Optional[AugmentParams]) -> torch.Tensor:
        """uint8 (C, H, W) -> float (C, size, size), augmented as `params` (draw_augment) say."""
        return self.apply_batch(image[None], None if params is None else [params])[0]

    def apply_batch(self, images: torch.Tensor,
                    params: Optional[list[AugmentParams]]) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float (B, C, size, size) on the images' device, one params per image."""
        if images.device.type == "cpu" and len(images) > 1:
            # On the CPU, image by image is faster: small buffers are reused, large ones page-fault.
            each = params if params is not None else [None] * len(images)
            return torch.stack([self.apply(im, q) for im, q in zip(images, each)])
        x = images.float().div_(255.0)
        if x.shape[-2:] != (self.size, self.size):
            x = resize(x, self.size)
        if params is not None:
            x = augment_batch(x, params)
        if self.normalize:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of float (B, C, H, W) images in [0, 1] to (B, C, size, size)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0)


class AugmentParams(NamedTuple):
    """The random choices of the augmentation for one image."""

    top: int  # crop offset in the padded image
    left: int
    brightness: float
    contrast: float
    saturation: float
    flip: bool


def draw_augment(generator: torch.Generator) -> AugmentParams:
    """Draw crop offsets, jitter factors and the flip, in a fixed order, from `generator`."""
    low, high = 1 - AUGMENT_JITTER, 1 + AUGMENT_JITTER
    top, left = (int(torch.randint(0, 2 * AUGMENT_PADDING + 1, (), generator=generator))
                 for _ in range(2))
    factors = [low + (high - low) * torch.rand((), generator=generator).item() for _ in range(3)]
    flip = torch.rand((), generator=generator).item() < 0.5
    return AugmentParams(top, left, *factors, flip)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma of (B, C, H, W) colour images as (B, 1, H, W); grey images pass through."""
    if x.shape[1] != 3:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def augment_batch(x: torch.Tensor, params: list[AugmentParams]) -> torch.Tensor:
    """Random crop with padding, colour jitter and horizontal flip of float (B, C, H, W) images."""
    b, c, h, w = x.shape
    p = AUGMENT_PADDING
    padded = F.pad(x, (p, p, p, p))
    # Slicing per image (views, one stack) is cheaper than a gather on both CPU and GPU.
    x = torch.stack([padded[i, :, q.top:q.top + h, q.left:q.left + w] for i, q in enumerate(params)])
    table = torch.tensor([q[2:] for q in params], dtype=x.dtype).to(x.device)  # (B, 4)
    factor = table[:, :3].view(b, 3, 1, 1, 1)
    x = (x * factor[:, 0]).clamp(0, 1)  # brightness
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factor[:, 1] + mean).clamp(0, 1)  # contrast
    grey = _grey(x)
    x = ((x - grey) * factor[:, 2] + grey).clamp(0, 1)  # saturation
    flips = [i for i, q in enumerate(params) if q.flip]
    if flips:
        index = torch.tensor(flips, device=x.device)
        x = x.index_copy(0, index, x.index_select(0, index).flip(-1))
    return x.contiguous()
