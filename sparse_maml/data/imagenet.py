"""MiniImageNet and tieredImageNet in the layouts found in the wild, plus the prepared `npy` form.

MiniImageNet classes are ordered by name (WordNet id) in every layout, and images within a class
keep their stored order, so the same images give the same episodes whatever the layout.
tieredImageNet classes keep the order of its label files.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .base import (MAX_EXPANSION, MAX_IMAGE_PIXELS, ArraySplit, DataError, EncodedSplit,
                   FewShotSplit, Hdf5Split, ImageFileSplit, inside, read_text, visible_entries)
from .layouts import Layout

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def _first_complete(candidates: Iterable[tuple[Path, ...]]) -> Optional[tuple[Path, ...]]:
    """The first of `candidates` whose files all exist."""
    return next((files for files in candidates if all(p.is_file() for p in files)), None)


def image_files(folder: Path) -> list[Path]:
    """The images of a class folder, sorted by name (hidden entries and other files skipped)."""
    return sorted(p for p in visible_entries(folder) if p.suffix.lower() in IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# The prepared form: {split}_images.npy (uint8, (N, H, W, C), rows grouped by class) and
# {split}_index.json ({"classes": [...], "counts": [...]}); memory-mapped, nothing decoded.

def find_npy(root: Path, split: str) -> Optional[tuple[Path, Path]]:
    return _first_complete([(root / f"{split}_images.npy", root / f"{split}_index.json")])


def open_npy(name: str, split: str, files: tuple[Path, Path]) -> FewShotSplit:
    images_path, index_path = files
    try:
        index = json.loads(read_text(index_path, "index file"))
        classes, counts = list(index["classes"]), [int(n) for n in index["counts"]]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"index file {index_path} is corrupt ({err})") from err
    if len(counts) != len(classes) or any(n < 0 for n in counts):
        raise DataError(f"index file {index_path} is corrupt: {len(classes)} classes but "
                        f"{len(counts)} counts, or a negative count")
    try:
        # A memory map reads the header only; a shape larger than the file fails here.
        images = np.load(images_path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"array file {images_path} is corrupt ({err})") from err
    if not isinstance(images, np.ndarray):  # an .npz archive under the .npy name
        images.close()
        raise DataError(f"array file {images_path} is an .npz archive, not one .npy array")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != sum(counts):
        raise DataError(f"array file {images_path} holds {images.dtype} {images.shape}, but "
                        f"{index_path} lists {sum(counts)} uint8 images")
    check_image_shape(images.shape[1:], f"array file {images_path}")
    starts = np.cumsum([0] + counts)
    rows = [np.arange(starts[c], starts[c + 1]) for c in range(len(classes))]
    channels = 1 if images.ndim == 3 else images.shape[-1]
    return ArraySplit(name, split, classes, [images], rows, channels=channels,
                      source=str(images_path))


def check_image_shape(shape: tuple[int, ...], where: str) -> None:
    """Refuse stored images whose `shape` is not (H, W), (H, W, C) or (C, H, W) with C 1 or 3 and
    at most MAX_IMAGE_PIXELS pixels: reading one allocates what the shape says."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 2:
        side = shape
    elif len(shape) == 3 and shape[2] in (1, 3):
        side = shape[:2]
    elif len(shape) == 3 and shape[0] in (1, 3):
        side = shape[1:]
    else:
        side = (MAX_IMAGE_PIXELS + 1, 1)
    if side[0] * side[1] > MAX_IMAGE_PIXELS:
        raise DataError(f"{where}: images of shape {shape} are not (H, W), (H, W, 1|3) or "
                        f"(1|3, H, W) with at most {MAX_IMAGE_PIXELS:,} pixels")


def write_npy(root: Path, split: str, classes: list[str], arrays: Iterable[np.ndarray],
              total: int, shape: tuple[int, ...]) -> None:
    """Write the prepared form of one split from per-class uint8 (n, H, W, C) arrays."""
    root.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(root / f"{split}_images.npy", mode="w+", dtype=np.uint8,
                                    shape=(total, *shape))
    counts, row = [], 0
    for array in arrays:
        out[row:row + len(array)] = array
        row += len(array)
        counts.append(len(array))
    if row != total or len(counts) != len(classes):
        raise DataError(f"prepared {split} split of {root}: wrote {row} images of {len(counts)} "
                        f"classes, expected {total} of {len(classes)}")
    out.flush()
    del out
    (root / f"{split}_index.json").write_text(json.dumps({"classes": classes, "counts": counts}))


# ---------------------------------------------------------------------------------------------
# MiniImageNet

def find_hdf5(folders: list[Path], split: str) -> Optional[tuple[Path, Path]]:
    return _first_complete((f / f"{split}_data.hdf5", f / f"{split}_labels.json") for f in folders)


def open_hdf5(name: str, split: str, files: tuple[Path, Path], sort: bool) -> FewShotSplit:
    import h5py

    data, labels_path = files
    try:
        labels = [str(c) for c in json.loads(read_text(labels_path, "label file"))]
    except (ValueError, TypeError) as err:
        raise DataError(f"label file {labels_path} is corrupt ({err})") from err
    try:
        with h5py.File(data, "r") as f:
            group = f["datasets"]
            missing = [c for c in labels if c not in group]
            if missing:
                raise DataError(f"HDF5 file {data} has no dataset for class {missing[0]!r} "
                                f"listed in {labels_path} ({len(missing)} missing)")
            classes = sorted(labels) if sort else labels
            for c in classes:
                check_stored(group[c], f"HDF5 file {data}, class {c!r}")
            sizes = [len(group[c]) for c in classes]
            first = group[classes[0]] if classes else None
            grey = first is not None and first.dtype == np.uint8 and first.ndim == 3
    except (OSError, KeyError, AttributeError, TypeError, ValueError) as err:
        raise DataError(f"HDF5 file {data} is corrupt or not in torchmeta's format "
                        f"({err})") from err
    return Hdf5Split(name, split, data, classes, sizes, channels=1 if grey else 3)


def check_stored(dataset: Any, where: str) -> None:
    """Refuse an HDF5 dataset whose declared shape is not backed by stored data: a few bytes of
    file can declare millions of images (read back as zeros), compress them MAX_EXPANSION-fold and
    more, or declare one image of billions of pixels."""
    import h5py

    if dataset.dtype == np.uint8 and dataset.ndim >= 3:
        check_image_shape(dataset.shape[1:], where)
    elif not ((dataset.ndim == 1 and h5py.check_vlen_dtype(dataset.dtype) is not None)
              or (dataset.dtype == np.uint8 and dataset.ndim == 2)):  # encoded bytes per row
        raise DataError(f"{where}: holds {dataset.dtype} {dataset.shape}, neither uint8 images nor "
                        "encoded image bytes")
    if dataset.size == 0:
        return
    layout = dataset.id.get_create_plist().get_layout()
    stored = dataset.id.get_storage_size()
    declared = dataset.id.get_type().get_size() * dataset.size
    if layout == h5py.h5d.CHUNKED:
        chunks = [-(-n // c) for n, c in zip(dataset.shape, dataset.chunks)]
        complete = dataset.id.get_num_chunks() == int(np.prod(chunks))
        complete = complete and declared <= MAX_EXPANSION * stored
    elif layout == h5py.h5d.CONTIGUOUS:
        complete = stored >= declared
    else:  # compact: the data is in the header itself
        complete = True
    if not complete:
        raise DataError(f"{where}: declares {dataset.shape} ({declared:,} bytes) but stores "
                        f"{stored:,} bytes of it (unwritten parts read as zeros; more than "
                        f"{MAX_EXPANSION}-fold compression is not image data)")


def _mini_pickle(root: Path, split: str) -> Optional[tuple[Path]]:
    return _first_complete((root / f"mini-imagenet-cache-{a}.pkl",) for a in SPLIT_ALIASES[split])


def _text(key: Any) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)


# The only globals the dataset pickles need: NumPy's array and scalar reconstructors (under their
# NumPy 1 and NumPy 2 module names; _frombuffer for protocol 5) and the bytes encoder of protocol-2
# pickles. Anything else (a function a crafted file asks to call) is refused before it is looked
# up, so it never runs.
SAFE_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """_codecs.encode as protocol-2 pickles use it (bytes written as latin1 text). Other codecs are
    refused: 'hex' doubles its input, so a few nested calls in a small file would ask for TBs."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"it calls _codecs.encode with {type(text).__name__} and "
                                     f"codec {encoding!r}; a dataset pickle only encodes text as "
                                     "latin1")
    return text.encode("latin1")


class _DataUnpickler(pickle.Unpickler):
    """Admits dicts, lists, tuples, strings, bytes, numbers and NumPy arrays; nothing callable."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a dataset pickle "
                                         "never holds (only dicts, lists, strings, bytes and NumPy "
                                         "arrays are read); nothing in it was run")
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        return super().find_class(module, name)


def load_pickle(path: Path) -> Any:
    """Unpickle a dataset file with a restricted unpickler (see SAFE_PICKLE_GLOBALS); Python 2
    pickles are read with latin1 for NumPy arrays."""
    try:
        with open(path, "rb") as f:
            try:
                return _DataUnpickler(f).load()
            except UnicodeDecodeError:
                f.seek(0)
                return _DataUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise DataError(f"pickle file {path} was refused: {err}") from err
    except (EOFError, ValueError, AttributeError, ImportError, TypeError) as err:
        raise DataError(f"pickle file {path} is corrupt or truncated ({err})") from err


def _pickled_dict(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The dict a dataset pickle holds, its keys as text; refused unless it has all of `keys`."""
    content = load_pickle(path)
    if not isinstance(content, dict):
        raise DataError(f"pickle file {path} does not hold a dict")
    content = {_text(k): v for k, v in content.items()}
    if not all(key in content for key in keys):
        raise DataError(f"pickle file {path} lacks {' or '.join(keys)} (keys: {sorted(content)})")
    return content


def open_mini_pickle(root: Path, split: str, files: tuple[Path]) -> FewShotSplit:
    """A mini-imagenet-cache pickle: image_data (N, 84, 84, 3) uint8 and class_dict {wnid: rows}."""
    (path,) = files
    content = _pickled_dict(path, ("image_data", "class_dict"))
    images = np.asarray(content["image_data"])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"pickle file {path}: image_data is {images.dtype} {images.shape}, "
                        "expected uint8 (N, H, W, C)")
    try:
        class_dict = {_text(k): [int(i) for i in v] for k, v in content["class_dict"].items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise DataError(f"pickle file {path}: class_dict is not a mapping of class -> row numbers "
                        f"({err})") from err
    for name, rows in class_dict.items():
        bad = [i for i in rows if not 0 <= i < len(images)]
        if bad:
            raise DataError(f"pickle file {path}: class {name} lists row {bad[0]}, but image_data "
                            f"has rows 0..{len(images) - 1} ({len(bad)} of its rows are out of "
                            "range)")
    classes = sorted(class_dict)
    rows = [np.asarray(class_dict[c]) for c in classes]
    return ArraySplit("miniimagenet", split, classes, [images], rows, source=str(path))


def _csv_files(root: Path, split: str) -> Optional[Path]:
    path = root / f"{split}.csv"
    return path if path.is_file() and (root / "images").is_dir() else None


def open_csv(root: Path, split: str, path: Path) -> FewShotSplit:
    """Classes (sorted) and their images from a Ravi-style `filename,label` CSV over root/images;
    a file name that leaves images/ is refused."""
    image_dir = root / "images"
    by_class: dict[str, list[Path]] = {}
    try:
        rows = list(csv.reader(read_text(path, "CSV file").splitlines()))
    except csv.Error as err:
        raise DataError(f"CSV file {path} is corrupt ({err})") from err
    for k, row in enumerate(rows):
        if not row or (k == 0 and row[0].strip().lower() == "filename"):
            continue
        if len(row) < 2:
            raise DataError(f"{path}, line {k + 1}: expected filename,label, got {row}")
        file = inside(image_dir, row[0], f"{path}, line {k + 1}")
        by_class.setdefault(row[1].strip(), []).append(file)
    classes = sorted(by_class)
    missing = [p for c in classes for p in by_class[c] if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} images listed in {path} are missing from {image_dir}, "
                        f"e.g. {missing[0]}")
    return ImageFileSplit("miniimagenet", split, classes, [by_class[c] for c in classes])


def _split_folder(root: Path, split: str) -> Optional[Path]:
    folders = (root / alias for alias in SPLIT_ALIASES[split])
    return next((f for f in folders if f.is_dir() and any(p.is_dir() for p in visible_entries(f))),
                None)


def open_folder(root: Path, split: str, folder: Path) -> FewShotSplit:
    """`split/class/*.jpg`: the classes are the sub-folders, sorted by name."""
    classes = sorted(p.name for p in visible_entries(folder) if p.is_dir())
    files = [image_files(folder / c) for c in classes]
    return ImageFileSplit("miniimagenet", split, classes, files)


MINI_LAYOUTS = [
    Layout("npy", "{split}_images.npy + {split}_index.json (written by utils/prepare_data.py)",
           find_npy, lambda root, split, files: open_npy("miniimagenet", split, files)),
    Layout("hdf5", "miniimagenet/{split}_data.hdf5 + miniimagenet/{split}_labels.json (torchmeta)",
           lambda root, split: find_hdf5([root / "miniimagenet", root], split),
           lambda root, split, files: open_hdf5("miniimagenet", split, files, sort=True)),
    Layout("pickle", "mini-imagenet-cache-{train,val|validation,test}.pkl (learn2learn, "
           "mini-imagenet.tar.gz)", _mini_pickle, open_mini_pickle),
    Layout("csv", "{train,val,test}.csv (filename,label; Ravi & Larochelle) + images/*.jpg",
           _csv_files, open_csv),
    Layout("folder", "{train,val,test}/<class>/*.jpg (ImageFolder)", _split_folder, open_folder),
]


# ---------------------------------------------------------------------------------------------
# tieredImageNet

def _tiered_pickles(root: Path, split: str) -> Optional[tuple[Path, Path]]:
    return _first_complete((root / f"{a}_images_png.pkl", root / f"{a}_labels.pkl")
                           for a in SPLIT_ALIASES[split])


def open_tiered_pickles(root: Path, split: str, files: tuple[Path, Path]) -> FewShotSplit:
    """Per-class encoded PNG images of `{split}_images_png.pkl`, grouped by `{split}_labels.pkl`."""
    images_path, labels_path = files
    images = load_pickle(images_path)
    labels = _pickled_dict(labels_path, ("label_specific",))
    try:
        specific = np.asarray(labels["label_specific"]).astype(np.int64).reshape(-1)
    except (ValueError, TypeError, OverflowError) as err:
        raise DataError(f"pickle file {labels_path}: label_specific is not a list of class "
                        f"numbers ({err})") from err
    if not hasattr(images, "__len__") or len(specific) != len(images):
        raise DataError(f"{labels_path} labels {len(specific)} images but {images_path} holds "
                        f"{len(images) if hasattr(images, '__len__') else 'no list of'} images")
    # Every list below is sized by the labels: check them against the data first, so that a label
    # file naming class 10**7 is refused instead of allocating ten million classes.
    present = np.unique(specific)
    if len(specific) and (present[0] != 0 or present[-1] != len(present) - 1):
        raise DataError(f"pickle file {labels_path}: label_specific runs from {int(present[0])} to "
                        f"{int(present[-1])}, but only {len(present)} classes are present; "
                        f"expected the classes 0..{len(present) - 1} of its {len(images)} images")
    try:
        names = [_text(n) for n in labels.get("label_specific_str", [])]
    except TypeError as err:
        raise DataError(f"pickle file {labels_path}: label_specific_str is not a list of class "
                        f"names ({err})") from err
    if len(names) != len(present):
        names = [str(c) for c in range(len(present))]
    members: list[list[Any]] = [[] for _ in present]
    for image, label in zip(images, specific):
        members[label].append(image)
    return EncodedSplit("tieredimagenet", split, names, members, source=str(images_path))


TIERED_LAYOUTS = [
    Layout("npy", "{split}_images.npy + {split}_index.json (written by utils/prepare_data.py)",
           find_npy, lambda root, split, files: open_npy("tieredimagenet", split, files)),
    Layout("hdf5", "tieredimagenet/{split}_data.hdf5 + tieredimagenet/{split}_labels.json "
           "(torchmeta)",
           lambda root, split: find_hdf5([root / "tieredimagenet", root], split),
           lambda root, split, files: open_hdf5("tieredimagenet", split, files, sort=False)),
    Layout("pickle", "{train,val,test}_images_png.pkl + {train,val,test}_labels.pkl "
           "(tiered-imagenet.tar)", _tiered_pickles, open_tiered_pickles),
]
