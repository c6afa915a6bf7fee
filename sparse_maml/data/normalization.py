"""Input normalisation as data.normalize asks: ImageNet's statistics, the train split's, or none.

The train split's per-channel mean and std (data.normalize=train) are those of the images as the
network sees them before normalisation (decoded, converted, resized, scaled to [0, 1]). They are
recorded in <data.root>/train_statistics.json under channels and size, with the content key of the
split: a digest of its class names, file names and file bytes, so any changed image, even one of
the same size and name, means a new computation (hashing costs a read; decoding is the expensive
part). Recorded values are checked when read back (finite, one per channel, mean in [0, 1], std in
[MIN_STD, 0.5]); a record that fails is refused, naming the file and entry. A read-only root only
means the statistics are computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from ..files import atomic_write
from .base import DataError, FewShotSplit, ImageFileSplit, read_text
from .folder import open_folder
from .transforms import IMAGENET_MEAN, IMAGENET_STD, resize

STATISTICS_FILE = "train_statistics.json"
# Pixels lie in [0, 1], so a channel's std is at most 0.5; below MIN_STD a channel is constant and
# dividing by its std would blow inputs up (compute_statistics refuses such a split).
MIN_STD, MAX_STD = 1e-6, 0.5
STATISTICS_FILE_BYTES = 2**20  # a record holds a few numbers per (channels, size)


class TrainStatistics(NamedTuple):
    """Per-channel mean and std of a train split, and the content key of its images."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    content_key: str


def content_key(split: ImageFileSplit) -> str:
    """A sha256 digest of the train split's class names, file names and file bytes."""
    digest = hashlib.sha256()
    for name, files in zip(split.class_names, split.files):
        for path in files:
            try:
                with open(path, "rb") as f:
                    file_digest = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as err:
                raise DataError(f"image file {path} cannot be read "
                                f"({err.strerror or err})") from err
            digest.update(f"{name}/{path.name}:{file_digest}\n".encode())
    return digest.hexdigest()


def compute_statistics(split: FewShotSplit, size: int) -> tuple[tuple[float, ...], ...]:
    """Per-channel (mean, std) of every image of `split`, resized to `size`, scaled to [0, 1]."""
    total, squares = torch.zeros(2, split.channels, dtype=torch.float64)
    pixels = 0
    for label in range(split.num_classes):
        for index in range(split.class_size(label)):
            try:
                x = split.load(label, index)[None].float().div_(255.0)  # (1, C, H, W)
            except DataError as err:
                raise DataError(f"{err} (found computing the train statistics; train.py "
                                "--check-data lists every bad image)") from err
            if x.shape[-2:] != (size, size):
                x = resize(x, size)
            x = x[0].double().flatten(1)  # (C, size*size)
            total += x.sum(1)
            squares += (x * x).sum(1)
            pixels += x.shape[1]
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(0).sqrt()
    flat = [c for c in range(split.channels) if std[c] < MIN_STD]
    if flat:
        raise DataError(f"{split.name}/{split.split}: channel {flat[0]} is constant over all "
                        f"{pixels // (size * size)} images, so it cannot be normalised by its std; "
                        "use data.normalize=none")
    return tuple(mean.tolist()), tuple(std.tolist())


def _read_record(path: Path) -> dict:
    """The recorded statistics ({} when there are none); a file that is not a JSON object of
    entries is refused, naming it."""
    if not path.exists():
        return {}
    text = read_text(path, "statistics file", STATISTICS_FILE_BYTES)
    try:
        record = json.loads(text)
    except ValueError as err:
        raise DataError(f"statistics file {path} is corrupt ({err}); delete it to compute the "
                        "statistics again") from err
    if not isinstance(record, dict):
        raise DataError(f"statistics file {path} does not hold a JSON object; delete it to compute "
                        "the statistics again")
    return record


def _checked_entry(entry: dict, channels: int, path: Path, key: str) -> TrainStatistics:
    """The statistics of a recorded entry, refused unless every value is plausible."""
    mean, std = entry.get("mean"), entry.get("std")

    def numbers(values) -> bool:
        return (isinstance(values, list) and len(values) == channels
                and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                        and math.isfinite(v) for v in values))

    if not (numbers(mean) and numbers(std) and all(0.0 <= v <= 1.0 for v in mean)
            and all(MIN_STD <= v <= MAX_STD for v in std)):
        raise DataError(f"statistics file {path}, entry {key!r}: mean {mean} / std {std} are not "
                        f"{channels} finite values with mean in [0, 1] and std in [{MIN_STD}, "
                        f"{MAX_STD}]; delete the file to compute them again")
    return TrainStatistics(tuple(float(v) for v in mean), tuple(float(v) for v in std),
                           entry["content_key"])


def train_statistics(root: str | Path, channels: int, size: int) -> TrainStatistics:
    """Mean, std and content key of the train split of the folder dataset in `root`, read as
    `channels` channels resized to `size`: recorded in root/train_statistics.json for that content
    key, or computed and recorded."""
    root = Path(root)
    train = open_folder(root, "train", channels, size)
    key = f"{channels}x{size}"
    content = content_key(train)
    path = root / STATISTICS_FILE
    record = _read_record(path)
    entry = record.get(key)
    if isinstance(entry, dict) and entry.get("content_key") == content:
        return _checked_entry(entry, channels, path, key)
    mean, std = compute_statistics(train, size)
    record[key] = {"content_key": content, "channels": channels, "image_size": size,
                   "num_images": sum(len(f) for f in train.files), "mean": list(mean),
                   "std": list(std)}
    with contextlib.suppress(OSError):  # a root that cannot be written: computed again next time
        atomic_write(path, lambda f: json.dump(record, f, indent=1))
    return TrainStatistics(mean, std, content)


def normalization_statistics(data) -> Optional[TrainStatistics]:
    """The train statistics a DataConfig normalises with (data.normalize=train, or auto for the
    folder dataset), with their content key; None when it normalises otherwise."""
    auto = data.normalize == "auto" and data.name == "folder"
    if data.normalize != "train" and not auto:
        return None
    if data.name != "folder":
        raise DataError(f"data.normalize=train is for data.name=folder, not {data.name}")
    return train_statistics(data.root, 1 if data.grayscale else 3, data.image_size)


def configure_normalization(split: FewShotSplit, data) -> FewShotSplit:
    """Set `split`'s normalisation as `data.normalize` (a DataConfig field) asks; returns it."""
    statistics = normalization_statistics(data)
    if statistics is not None:
        split.normalize, split.mean, split.std = True, statistics.mean, statistics.std
        split.statistics_key = statistics.content_key
    elif data.normalize == "none":
        split.normalize = False
    elif data.normalize == "imagenet":
        if split.channels != 3:
            raise DataError(f"data.normalize=imagenet needs colour images, but {split.name} has "
                            f"{split.channels} channel(s); use data.normalize=none")
        split.normalize, split.mean, split.std = True, IMAGENET_MEAN, IMAGENET_STD
    return split


def input_record(split: FewShotSplit, image_size: int) -> dict:
    """How a run reads its inputs, saved in its checkpoints so that evaluating it needs no train
    data: channels, side, the normalisation, and the content key of train statistics (if any)."""
    return {"channels": split.channels, "image_size": image_size,
            "normalize": bool(split.normalize),
            "mean": [float(m) for m in split.mean] if split.normalize else None,
            "std": [float(s) for s in split.std] if split.normalize else None,
            "statistics_key": getattr(split, "statistics_key", None)}


def check_input_record(record: object, source: str) -> dict:
    """`record` if it is an input record a run could have written; else DataError naming `source`
    (a received checkpoint may hold anything)."""
    def bad(what: str) -> DataError:
        return DataError(f"{source}: its input record {what}")

    if not isinstance(record, dict):
        raise bad("is not a mapping")
    channels, size = record.get("channels"), record.get("image_size")
    if channels not in (1, 3) or isinstance(channels, bool) or not isinstance(size, int) \
            or not 1 <= size <= 4096:
        raise bad(f"has channels={channels!r:.20}, image_size={size!r:.20}")
    if record.get("normalize") is True:
        values = [record.get("mean"), record.get("std")]
        if not all(isinstance(v, list) and len(v) == channels
                   and all(isinstance(x, float) and math.isfinite(x) for x in v) for v in values):
            raise bad("has no finite mean and std per channel")
        if not all(MIN_STD <= x <= 1 for x in values[1]):
            raise bad(f"has a std outside [{MIN_STD}, 1]")
    return record


def apply_input_record(split: FewShotSplit, record: object, source: str) -> FewShotSplit:
    """Normalise `split` (opened with normalized=False) as the run recorded in `source` did;
    DataError naming `source` for a record that is damaged or does not fit the split."""
    record = check_input_record(record, source)
    if record["channels"] != split.channels:
        raise DataError(f"{source}: the run read {record['channels']} input channel(s), but "
                        f"{split.describe()} has {split.channels}")
    split.normalize = record.get("normalize") is True
    if split.normalize:
        split.mean, split.std = tuple(record["mean"]), tuple(record["std"])
    return split
