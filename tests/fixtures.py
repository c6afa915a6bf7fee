"""Tiny generated datasets in every supported layout, for the tests.

Images are random uint8 pictures passed once through JPEG, so the layouts that store JPEG files
(csv, folder) and those that store pixels (npy, hdf5, pickle) hold exactly the same images.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from sparse_maml.data.photos import class_split

SPLIT_NAMES = ("train", "val", "test")


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def random_images(count: int, size: int, rng: np.random.Generator) -> list[tuple[bytes, np.ndarray]]:
    """`count` (JPEG bytes, decoded uint8 (size, size, 3) pixels) pairs of blurry random pictures."""
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (max(size // 8, 2), max(size // 8, 2), 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
        noise = rng.integers(-20, 21, image.shape)
        data = _jpeg(np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8))
        out.append((data, _decode(data)))
    return out


MiniData = dict[str, tuple[list[str], list[list[tuple[bytes, np.ndarray]]]]]


def make_miniimagenet(classes: tuple[int, int, int] = (6, 5, 5), per_class: int = 6, size: int = 84,
                      seed: int = 0) -> MiniData:
    """{split: (class names, per class [(jpeg, pixels)])} with WordNet-like class names."""
    rng = np.random.default_rng(seed)
    data: MiniData = {}
    first = 0
    for split, n in zip(SPLIT_NAMES, classes):
        names = [f"n{first + c:08d}" for c in range(n)]
        data[split] = (names, [random_images(per_class, size, rng) for _ in names])
        first += n
    return data


def write_miniimagenet(root: Path, layout: str, data: MiniData, val_name: str = "val",
                       bytes_keys: bool = False) -> Path:
    """Write `data` under `root` in `layout` (npy, hdf5, pickle, csv or folder); return root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, (names, classes) in data.items():
        disk_split = val_name if split == "val" else split
        pixels = [np.stack([p for _, p in images]) for images in classes]  # per class (n, H, W, 3)
        if layout == "npy":
            from sparse_maml.data.imagenet import write_npy

            write_npy(root, split, names, pixels, sum(len(p) for p in pixels), pixels[0].shape[1:])
        elif layout == "hdf5":
            import h5py

            folder = root / "miniimagenet"
            folder.mkdir(exist_ok=True)
            with h5py.File(folder / f"{split}_data.hdf5", "w") as f:
                group = f.create_group("datasets")
                for name, array in zip(names, pixels):
                    group.create_dataset(name, data=array)
            (folder / f"{split}_labels.json").write_text(json.dumps(names[::-1]))
        elif layout == "pickle":
            # Shuffle the storage order of classes so the reader must use class_dict.
            order = names[::-1]
            image_data = np.concatenate([pixels[names.index(n)] for n in order])
            offsets = np.cumsum([0] + [len(pixels[names.index(n)]) for n in order])
            rows = {n: list(range(offsets[k], offsets[k + 1])) for k, n in enumerate(order)}
            content = {"image_data": image_data, "class_dict": rows}
            if bytes_keys:
                content = {k.encode(): ({n.encode(): v for n, v in rows.items()}
                                        if k == "class_dict" else v) for k, v in content.items()}
            with open(root / f"mini-imagenet-cache-{disk_split}.pkl", "wb") as f:
                pickle.dump(content, f)
        elif layout == "csv":
            images_dir = root / "images"
            images_dir.mkdir(exist_ok=True)
            lines = ["filename,label"]
            for name, images in zip(names, classes):
                for k, (jpeg, _) in enumerate(images):
                    filename = f"{name}{k + 1:08d}.jpg"
                    (images_dir / filename).write_bytes(jpeg)
                    lines.append(f"{filename},{name}")
            (root / f"{disk_split}.csv").write_text("\n".join(lines) + "\n")
        elif layout == "folder":
            for name, images in zip(names, classes):
                folder = root / disk_split / name
                folder.mkdir(parents=True, exist_ok=True)
                for k, (jpeg, _) in enumerate(images):
                    (folder / f"{name}_{k:05d}.jpg").write_bytes(jpeg)
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return root


def write_tieredimagenet(root: Path, layout: str, data: MiniData) -> Path:
    """Write `data` as tieredImageNet pickles (PNG bytes + labels) or torchmeta hdf5."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, (names, classes) in data.items():
        encoded = [[np.frombuffer(_png(p), dtype=np.uint8) for _, p in images] for images in classes]
        if layout == "pickle":
            images = [e for per_class in encoded for e in per_class]
            labels = np.concatenate([np.full(len(e), c) for c, e in enumerate(encoded)])
            with open(root / f"{split}_images_png.pkl", "wb") as f:
                pickle.dump(images, f)
            with open(root / f"{split}_labels.pkl", "wb") as f:
                pickle.dump({"label_specific": labels, "label_specific_str": names,
                             "label_general": np.zeros_like(labels)}, f)
        elif layout == "hdf5":
            import h5py

            folder = root / "tieredimagenet"
            folder.mkdir(exist_ok=True)
            with h5py.File(folder / f"{split}_data.hdf5", "w") as f:
                group = f.create_group("datasets")
                for name, per_class in zip(names, encoded):
                    ds = group.create_dataset(name, (len(per_class),),
                                              dtype=h5py.vlen_dtype(np.dtype("uint8")))
                    for k, e in enumerate(per_class):
                        ds[k] = e
            (folder / f"{split}_labels.json").write_text(json.dumps(names))
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return root


def write_cub(root: Path, per_class: int = 2, size: int = 24, seed: int = 0,
              skip_class: Optional[str] = None) -> Path:
    """CUB_200_2011/images/<class>/*.jpg for all 200 shipped classes, `per_class` images each."""
    rng = np.random.default_rng(seed)
    images = Path(root) / "CUB_200_2011" / "images"
    for split in SPLIT_NAMES:
        for name in class_split("cub")[split]:
            if name == skip_class:
                continue
            folder = images / name
            folder.mkdir(parents=True, exist_ok=True)
            for k, (jpeg, _) in enumerate(random_images(per_class, size, rng)):
                (folder / f"{name.split('.')[1]}_{k:04d}.jpg").write_bytes(jpeg)
    return Path(root)


def write_cars(root: Path, per_class: int = 2, size: int = 32, seed: int = 0) -> Path:
    """cars_annos.mat + car_ims/*.jpg for all 196 shipped classes (boxes = the central half)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "car_ims").mkdir(parents=True, exist_ok=True)
    names = [n for split in SPLIT_NAMES for n in class_split("cars")[split]]
    names = sorted(names)  # the .mat order differs from the split files' order
    records = []
    for label, _ in enumerate(names, start=1):
        for jpeg, _ in random_images(per_class, size, rng):
            path = f"car_ims/{len(records) + 1:06d}.jpg"
            (root / path).write_bytes(jpeg)
            q = size // 4
            records.append((path, q, q, size - q - 1, size - q - 1, label, len(records) % 2))
    dtype = [("relative_im_path", object), ("bbox_x1", object), ("bbox_y1", object),
             ("bbox_x2", object), ("bbox_y2", object), ("class", object), ("test", object)]
    annotations = np.array([tuple(r) for r in records], dtype=dtype).reshape(1, -1)
    class_names = np.array(names, dtype=object).reshape(1, -1)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return root


def write_omniglot(root: Path, alphabets: int = 3, characters: int = 5, drawings: int = 4,
                   seed: int = 0) -> Path:
    """images_background/ and images_evaluation/ with random 105x105 binary drawings."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for subset in ("images_background", "images_evaluation"):
        for a in range(alphabets):
            for c in range(characters):
                folder = root / subset / f"{subset[7:]}_alphabet{a}" / f"character{c + 1:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                for d in range(drawings):
                    ink = rng.random((105, 105)) < 0.1
                    Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).convert("1").save(
                        folder / f"{c + 1:04d}_{d + 1:02d}.png")
    return root
