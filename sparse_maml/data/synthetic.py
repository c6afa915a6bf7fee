"""A built-in, Omniglot-like few-shot dataset: random glyph classes, drawn procedurally.

Each class is a glyph of 2-4 random strokes (quadratic Bezier curves). Each image of a class redraws
the glyph under its own random distortion (rotation, anisotropic scale, shear, shift, jitter of the
control points and stroke width), so a classifier must generalise across instances. Everything is
generated from (synthetic_seed, split, class), so every run sees the same data and nothing is downloaded.
"""

from __future__ import annotations

import math

import torch

from .base import FewShotSplit
from .episodes import task_seed

# Classes per split and images per class (Omniglot has 1623 characters of 20 drawings each).
SPLIT_CLASSES = {"train": 640, "val": 160, "test": 320}
IMAGES_PER_CLASS = 20
RENDER_SIZE = 28  # Omniglot-style 28x28 glyphs
CURVE_POINTS = 12  # samples along each Bezier stroke
# Instance distortions: control-point jitter (std), rotation range (radians), shift range.
JITTER, ROTATION, SHIFT = 0.15, math.pi / 3, 0.5


def _bezier(control: torch.Tensor) -> torch.Tensor:
    """(..., 3, 2) control points -> (..., CURVE_POINTS, 2) points on the quadratic curve."""
    t = torch.linspace(0, 1, CURVE_POINTS).view(-1, 1)
    p0, p1, p2 = control[..., 0:1, :], control[..., 1:2, :], control[..., 2:3, :]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _render(points: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """Polylines (images, strokes, P, 2) in [-1, 1] with widths (images,) -> (images, size, size)."""
    n = points.shape[0]
    a = points[:, :, :-1].reshape(n, -1, 2)  # segment starts (images, S, 2)
    b = points[:, :, 1:].reshape(n, -1, 2)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"), -1).view(1, -1, 1, 2)
    ab = (b - a)[:, None]  # (images, 1, S, 2)
    ap = grid - a[:, None]  # (images, pixels, S, 2)
    t = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-8)).clamp(0, 1)
    dist = (ap - t[..., None] * ab).norm(dim=-1).min(-1).values  # (images, pixels)
    ink = (1.5 - dist / width.view(-1, 1)).clamp(0, 1)  # anti-aliased stroke of half-width `width`
    return ink.view(n, size, size)


def generate_glyph_class(split: str, seed: int, label: int, images_per_class: int,
                         size: int = RENDER_SIZE) -> torch.Tensor:
    """uint8 (images, 1, size, size): the drawings of glyph class `label` of `split`."""
    g = torch.Generator().manual_seed(task_seed(seed, f"glyphs-{split}", label))
    strokes, m = 4, images_per_class
    control = torch.rand(strokes, 3, 2, generator=g) * 1.4 - 0.7
    used = torch.arange(strokes) < int(torch.randint(2, strokes + 1, (), generator=g))
    # Unused strokes collapse onto the first control point of stroke 0 (a dot inside the glyph).
    control = torch.where(used.view(strokes, 1, 1), control, control[:1, :1])
    jitter = control.expand(m, -1, -1, -1) + JITTER * torch.randn(m, strokes, 3, 2, generator=g)
    points = _bezier(jitter)  # (m, strokes, P, 2)
    angle = (torch.rand(m, generator=g) - 0.5) * ROTATION
    scale = 0.85 + 0.3 * torch.rand(m, 2, generator=g)
    shear = (torch.rand(m, generator=g) - 0.5) * 0.4
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear_m = torch.eye(2).repeat(m, 1, 1)
    shear_m[:, 0, 1] = shear
    affine = rot @ shear_m @ torch.diag_embed(scale)  # (m, 2, 2)
    shift = (torch.rand(m, 1, 1, 2, generator=g) - 0.5) * SHIFT
    points = torch.einsum("mij,mspj->mspi", affine, points) + shift
    width = 0.05 + 0.04 * torch.rand(m, generator=g)
    return (_render(points, width, size) * 255).round().to(torch.uint8)[:, None]


class SyntheticGlyphs(FewShotSplit):
    """One split of the built-in glyph dataset; each class is drawn on first use and kept as uint8."""

    def __init__(self, split: str, seed: int = 0):
        if split not in SPLIT_CLASSES:
            raise ValueError(f"synthetic split must be one of {sorted(SPLIT_CLASSES)}, got {split!r}")
        names = [str(label) for label in range(SPLIT_CLASSES[split])]
        super().__init__("synthetic", split, names, channels=1, native_size=RENDER_SIZE,
                         normalize=False)
        self.seed = seed
        self._classes: dict[int, torch.Tensor] = {}

    def class_size(self, label: int) -> int:
        return IMAGES_PER_CLASS

    def load(self, label: int, index: int) -> torch.Tensor:
        if label not in self._classes:
            self._classes[label] = generate_glyph_class(self.split, self.seed, label, IMAGES_PER_CLASS)
        return self._classes[label][index]
