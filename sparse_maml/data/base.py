"""What every few-shot dataset provides: one split's images, grouped by class, kept as uint8."""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .transforms import IMAGENET_MEAN, IMAGENET_STD


class DataError(RuntimeError):
    """A dataset that is missing, incomplete or unreadable; the message names the file or folder."""


class Task(NamedTuple):
    """One N-way episode (or a stack of them, with a leading task dimension)."""

    support_x: torch.Tensor  # (ways*shots, C, H, W) float, or (tasks, ways*shots, C, H, W)
    support_y: torch.Tensor  # (ways*shots,) int64 labels in 0..ways-1
    query_x: torch.Tensor  # (ways*query, C, H, W)
    query_y: torch.Tensor  # (ways*query,)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Task":
        return Task(*(t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def num_tasks(self) -> int:
        """Tasks in a stacked batch."""
        return self.support_x.shape[0]

    def select(self, index: int) -> "Task":
        """Task `index` of a stacked batch."""
        return Task(*(t[index] for t in self))


class FewShotSplit:
    """One split of a few-shot dataset: named classes (WordNet ids, folder names, ...), each a list
    of uint8 images. Subclasses implement `class_size` and `load`; images come back as uint8
    (C, H, W) tensors of any size (the transform resizes them), never as a float copy."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    """Per-channel statistics of the normalisation (ImageNet's unless data.normalize=train)."""

    def __init__(self, name: str, split: str, class_names: list[str], channels: int = 3,
                 native_size: int = 84, normalize: bool = True):
        self.name, self.split, self.channels = name, split, channels
        self.native_size = native_size  # the side images are resized to when data.image_size is 0
        self.normalize = normalize  # whether to normalise with `mean` and `std`
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_name(self, label: int) -> str:
        return self.class_names[label]

    def class_size(self, label: int) -> int:
        """Number of images of class `label`."""
        raise NotImplementedError

    def load(self, label: int, index: int) -> torch.Tensor:
        """Image `index` of class `label` as a uint8 (C, H, W) tensor."""
        raise NotImplementedError

    def load_many(self, label: int, indices: list[int]) -> list[torch.Tensor]:
        """Several images of one class (datasets with batched storage override this)."""
        return [self.load(label, i) for i in indices]

    def describe(self) -> str:
        """One line for logs: name, split and size."""
        sizes = [self.class_size(c) for c in range(self.num_classes)]
        return (f"{self.name}/{self.split}: {self.num_classes} classes, {sum(sizes)} images "
                f"({min(sizes)}-{max(sizes)} per class)")


def to_chw(array: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 (H, W), (H, W, C) or (C, H, W) array -> uint8 (channels, H, W) tensor."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)  # channels-first storage
    if array.shape[2] != channels:
        array = np.repeat(array, channels, axis=2) if array.shape[2] == 1 else array[:, :, :channels]
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))  # a writable copy


# Decoding refuses images with more pixels than this (a 8192 x 8192 photograph), before any
# pixel is decoded: a few bytes of PNG or JPEG header can declare 100000 x 100000 pixels, tens of
# GB once decoded. Few-shot datasets hold images of at most a few thousand pixels a side.
MAX_IMAGE_PIXELS = 8192 * 8192

# Received text files (index, label and statistics JSON, CSV lists) are read whole; a real one is
# at most a few MB, so anything larger is not one of them.
MAX_TEXT_BYTES = 64 * 2**20

# Stored data (an archive, compressed HDF5 chunks) may expand to at most this many times its own
# size: images barely compress, so real data is close to 1; more is a decompression bomb.
MAX_EXPANSION = 100


def read_text(path: Path, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """The text of a received `what` file (index file, label file, ...), refused when larger than
    `limit` bytes or not UTF-8; raises DataError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise DataError(f"{what} {path} is {size:,} bytes, over the {limit:,}-byte limit for "
                            "such a file; refused")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not UTF-8 text ({err})") from err
    except OSError as err:
        raise DataError(f"{what} {path} cannot be read ({err.strerror or err})") from err


def inside(root: Path, entry: str, where: str) -> Path:
    """`root / entry` for a relative path named by a data file (a CSV row, an annotation); DataError
    naming `where` and the entry when it is absolute or climbs out of `root`. The test is on the
    path as written, so a folder the user symlinked into `root` still works."""
    text = str(entry).strip()
    normal = os.path.normpath(text) if text else ""
    if (not text or "\x00" in text or os.path.isabs(text) or normal == os.pardir
            or normal.startswith(os.pardir + os.sep)):
        raise DataError(f"{where}: entry {text!r} is not a path inside {root}; refused")
    return Path(root) / normal


def _integer_range(image: Image.Image) -> tuple[int, int]:
    """The stored sample type's (lowest, highest) value of a mode I image: TIFF says its bits per
    sample and sample format; the other formats PIL reads as mode I (16-bit PGM, older PNG) are
    16-bit unsigned."""
    tags = getattr(image, "tag_v2", None) or {}
    bits, fmt = tags.get(258, (16,)), tags.get(339, (1,))
    bits = 32 if (max(bits) if isinstance(bits, tuple) else int(bits)) > 16 else 16
    if int(fmt[0] if isinstance(fmt, tuple) else fmt) == 2:  # signed integers
        return -2**(bits - 1), 2**(bits - 1) - 1
    return 0, 2**bits - 1


def _eight_bit(image: Image.Image, where: str) -> Image.Image:
    """Grey images of more than 8 bits scaled to 8 bits (PIL's convert clips them at 255 or 0).

    Integer images (modes I;16*, I) map the full range of their stored sample type onto 0..255, so
    the same stored value is the same grey in every image of a dataset. Float images (mode F) map
    [0, 1] onto 0..255 when every pixel lies in [0, 1] (keeping brightness comparable across
    images), else their own [min, max] (visible instead of white); NaN or infinite ones are refused.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        lowest, highest = (0, 2**16 - 1) if image.mode.startswith("I;16") else _integer_range(image)
        values = np.asarray(image, dtype=np.float64)
        scaled = (values - lowest) * (255.0 / (highest - lowest))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise DataError(f"image {where} is a float image holding NaN or infinite pixels")
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            scaled = (values - low) * (255.0 / (high - low) if high > low else 0.0)
        else:
            scaled = values * 255.0
    else:
        return image
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def decode_image(data: bytes | str | Path, channels: int, where: str,
                 box: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Decode an image file (a path or its bytes) to uint8 (channels, H, W), cropped to `box`
    ((x1, y1, x2, y2) in pixels, inclusive, as in the Stanford Cars annotations). A file that cannot
    be decoded, or that declares more than MAX_IMAGE_PIXELS pixels (checked before decoding),
    raises DataError naming `where`."""
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        with warnings.catch_warnings():
            # PIL's own bomb check warns (or raises) inside open(); ours below is the one that
            # counts, so its warning becomes an error caught here, never a line on stderr. (The
            # filter is process-wide; images are never decoded on several threads at once.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise DataError(too_many_pixels(where, f"{image.width} x {image.height}"))
                image = _eight_bit(image, where).convert("RGB" if channels == 3 else "L")
                if box is not None:
                    x1, y1, x2, y2 = (int(v) for v in box)
                    image = image.crop((max(x1, 0), max(y1, 0), min(x2 + 1, image.width),
                                        min(y2 + 1, image.height)))
                array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError as err:
        raise DataError(f"image file {where} is missing") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's check ran first (more than its own limit); its message holds the pixel count.
        count = re.search(r"\((\d+) pixels\)", str(err))
        raise DataError(too_many_pixels(where, f"{int(count[1]):,}" if count else "more")) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"image {where} is corrupt or not an image ({err})") from err
    return to_chw(array, channels)


def too_many_pixels(where: str, pixels: str) -> str:
    """The message for an image of more than MAX_IMAGE_PIXELS `pixels` (a decompression bomb)."""
    return (f"image {where} declares {pixels} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,} (8192 x 8192); refused before decoding")


def visible_entries(folder: Path) -> list[Path]:
    """The entries of `folder` a person sees: hidden ones (.ipynb_checkpoints, ._x.jpg, .DS_Store)
    are tool droppings, never classes or images."""
    return [p for p in Path(folder).iterdir() if not p.name.startswith(".")]


def _read_sorted(array: Any, rows: np.ndarray) -> np.ndarray:
    """array[rows], read in increasing row order (sequential on a memory map; h5py requires it)."""
    order = np.argsort(rows)
    return array[rows[order]][np.argsort(order)]


class ArraySplit(FewShotSplit):
    """Images that are rows of uint8 arrays (NumPy, memory-mapped .npy, pickled cache): class c is
    `arrays[c]` or the rows `rows[c]` of the shared `arrays[0]`. Arrays hold (N, H, W, C),
    (N, H, W) or (N, C, H, W) pixels; nothing is copied until read."""

    def __init__(self, name: str, split: str, class_names: list[str], arrays: list[Any],
                 rows: Optional[list[np.ndarray]] = None, channels: int = 3, native_size: int = 84,
                 normalize: bool = True, source: str = ""):
        super().__init__(name, split, class_names, channels, native_size, normalize)
        self.arrays, self.rows, self.source = arrays, rows, source

    def class_size(self, label: int) -> int:
        return len(self.rows[label]) if self.rows is not None else len(self.arrays[label])

    def load(self, label: int, index: int) -> torch.Tensor:
        return self.load_many(label, [index])[0]

    def load_many(self, label: int, indices: list[int]) -> list[torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64)
        if self.rows is not None:
            rows = np.asarray(self.rows[label])[rows].astype(np.int64)
        array = self.arrays[0] if self.rows is not None else self.arrays[label]
        return [to_chw(image, self.channels) for image in _read_sorted(array, rows)]


class EncodedSplit(FewShotSplit):
    """A split of encoded image files (PNG/JPEG bytes) held in memory, decoded on use."""

    def __init__(self, name: str, split: str, class_names: list[str], encoded: list[Sequence[Any]],
                 channels: int = 3, native_size: int = 84, normalize: bool = True, source: str = ""):
        super().__init__(name, split, class_names, channels, native_size, normalize)
        self.encoded, self.source = encoded, source

    def class_size(self, label: int) -> int:
        return len(self.encoded[label])

    def load(self, label: int, index: int) -> torch.Tensor:
        data = np.asarray(self.encoded[label][index], dtype=np.uint8).tobytes()
        where = f"{self.source} (class {self.class_names[label]}, image {index})"
        return decode_image(data, self.channels, where)


class ImageFileSplit(FewShotSplit):
    """Image files on disk, decoded on use: `files[c]` lists the files of class c; `boxes[c][i]`
    (optional) is the (x1, y1, x2, y2) crop of file i; `rotations[c]` (optional) turns every image
    of class c by that many quarter turns (counter-clockwise), so a rotated copy of a class is a
    class of its own; `invert` maps ink to 255."""

    def __init__(self, name: str, split: str, class_names: list[str], files: list[list[Path]],
                 channels: int = 3, native_size: int = 84, normalize: bool = True,
                 boxes: Optional[list[list[Sequence[int]]]] = None,
                 rotations: Optional[list[int]] = None, invert: bool = False):
        super().__init__(name, split, class_names, channels, native_size, normalize)
        self.files, self.boxes, self.rotations, self.invert = files, boxes, rotations, invert

    def class_size(self, label: int) -> int:
        return len(self.files[label])

    def load(self, label: int, index: int) -> torch.Tensor:
        path = self.files[label][index]
        box = self.boxes[label][index] if self.boxes is not None else None
        image = decode_image(path, self.channels, str(path), box)
        if self.invert:
            image = 255 - image
        if self.rotations is not None and self.rotations[label]:
            image = torch.rot90(image, self.rotations[label], dims=(1, 2)).contiguous()
        return image


class Hdf5Split(FewShotSplit):
    """A split stored as torchmeta writes it: `{split}_data.hdf5` with one dataset per class in the
    group `datasets`, holding uint8 (N, H, W, C) pixels or variable-length encoded image bytes. The
    file is opened lazily in each process (h5py handles do not survive fork)."""

    def __init__(self, name: str, split: str, path: Path, class_names: list[str],
                 sizes: list[int], channels: int = 3, native_size: int = 84, normalize: bool = True):
        super().__init__(name, split, class_names, channels, native_size, normalize)
        self.path, self.sizes = Path(path), sizes
        self._file: Any = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": -1}

    def _group(self) -> Any:
        import h5py

        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as err:
                raise DataError(f"HDF5 file {self.path} is corrupt or unreadable ({err})") from err
            self._pid = os.getpid()
        return self._file["datasets"]

    def class_size(self, label: int) -> int:
        return self.sizes[label]

    def load(self, label: int, index: int) -> torch.Tensor:
        return self.load_many(label, [index])[0]

    def load_many(self, label: int, indices: list[int]) -> list[torch.Tensor]:
        name = self.class_names[label]
        try:
            block = _read_sorted(self._group()[name], np.asarray(indices))
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise DataError(f"HDF5 file {self.path}: cannot read class {name!r} ({err})") from err
        images = []
        for item, index in zip(block, indices):
            if item.dtype == np.uint8 and item.ndim >= 2:
                images.append(to_chw(item, self.channels))
            else:  # variable-length encoded bytes (torchmeta's tieredImageNet)
                where = f"{self.path} (class {name}, image {index})"
                images.append(decode_image(np.asarray(item, np.uint8).tobytes(), self.channels,
                                           where))
        return images
