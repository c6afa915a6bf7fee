"""Input normalisation as data.normalize asks: ImageNet's statistics, the train split's, or none.

The train split's per-channel mean and std (data.normalize=train) are those of the images as the
network sees them before normalisation: decoded, converted to the configured channels, resized to
data.image_size and scaled to [0, 1]. They are computed once and recorded in
<data.root>/train_statistics.json, keyed by channels and size and valid while the train split's
files (names and sizes) are unchanged; a read-only root only means they are computed again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch

from .base import DataError, FewShotSplit, ImageFileSplit
from .folder import open_folder
from .transforms import IMAGENET_MEAN, IMAGENET_STD, resize

STATISTICS_FILE = "train_statistics.json"


def _fingerprint(split: ImageFileSplit, root: Path) -> str:
    """A digest of the train split's class names, file names and file sizes."""
    digest = hashlib.sha256()
    for name, files in zip(split.class_names, split.files):
        for path in files:
            digest.update(f"{name}/{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def compute_statistics(split: FewShotSplit, size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of every image of `split`, resized to `size` and scaled to [0, 1]."""
    total = torch.zeros(split.channels, dtype=torch.float64)
    squares = torch.zeros(split.channels, dtype=torch.float64)
    pixels = 0
    for label in range(split.num_classes):
        for index in range(split.class_size(label)):
            x = split.load(label, index)[None].float().div_(255.0)  # (1, C, H, W)
            if x.shape[-2:] != (size, size):
                x = resize(x, size)
            x = x[0].double().flatten(1)  # (C, size*size)
            total += x.sum(1)
            squares += (x * x).sum(1)
            pixels += x.shape[1]
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(0).sqrt()
    flat = [c for c in range(split.channels) if std[c] < 1e-6]
    if flat:
        raise DataError(f"{split.name}/{split.split}: channel {flat[0]} is constant over all "
                        f"{pixels // (size * size)} images, so it cannot be normalised by its std; "
                        "use data.normalize=none")
    return tuple(mean.tolist()), tuple(std.tolist())


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: computed again and rewritten
    return record if isinstance(record, dict) else {}


def _write_record(path: Path, record: dict) -> None:
    """Write atomically; a root that cannot be written keeps nothing (computed again next time)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def train_statistics(root: str | Path, channels: int, size: int
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the train split of the folder dataset in `root`: recorded, or computed and
    recorded in root/train_statistics.json."""
    root = Path(root)
    train = open_folder(root, "train", channels, size)
    key = f"{channels}x{size}"
    fingerprint = _fingerprint(train, root)
    path = root / STATISTICS_FILE
    record = _read_record(path)
    entry = record.get(key)
    if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint:
        mean, std = entry.get("mean"), entry.get("std")
        if (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in mean + std)
                and min(std) > 0):
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    mean, std = compute_statistics(train, size)
    record[key] = {"fingerprint": fingerprint, "channels": channels, "image_size": size,
                   "num_images": sum(len(f) for f in train.files), "mean": list(mean),
                   "std": list(std)}
    _write_record(path, record)
    return mean, std


def configure_normalization(split: FewShotSplit, data) -> FewShotSplit:
    """Set `split`'s normalisation as `data.normalize` (a DataConfig field) asks; returns it."""
    choice = data.normalize
    if choice == "auto":
        choice = "train" if data.name == "folder" else "dataset"
    if choice == "none":
        split.normalize = False
    elif choice == "imagenet":
        if split.channels != 3:
            raise DataError(f"data.normalize=imagenet needs colour images, but {split.name} has "
                            f"{split.channels} channel(s); use data.normalize=none")
        split.normalize, split.mean, split.std = True, IMAGENET_MEAN, IMAGENET_STD
    elif choice == "train":
        if data.name != "folder":
            raise DataError(f"data.normalize=train is for data.name=folder, not {data.name}")
        split.mean, split.std = train_statistics(data.root, split.channels, data.image_size)
        split.normalize = True
    return split
