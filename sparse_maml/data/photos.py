"""Cross-domain test sets (CUB-200-2011, Stanford Cars) and Omniglot, read from their archives'
extracted folders and decoded lazily.

The CUB (100/50/50 classes) and Cars (98/49/49 classes) splits ship with the package as JSON in
`splits/`; Cars images are cropped to their annotated bounding boxes.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .base import DataError, FewShotSplit, ImageFileSplit, inside, visible_entries
from .imagenet import image_files
from .layouts import PREPARE_HINT, Layout

SPLITS_DIR = Path(__file__).parent / "splits"


@lru_cache(maxsize=None)
def class_split(dataset: str) -> dict[str, list[str]]:
    """The shipped {split: [class names]} of `dataset` (cub or cars)."""
    return json.loads((SPLITS_DIR / f"{dataset}.json").read_text())


# ---------------------------------------------------------------------------------------------
# CUB-200-2011

def _cub_images(root: Path, split: str) -> Optional[Path]:
    folders = (root / "CUB_200_2011" / "images", root / "images")
    return next((f for f in folders if f.is_dir()), None)


def open_cub(root: Path, split: str, images: Path) -> FewShotSplit:
    classes = class_split("cub")[split]
    for name in classes:
        if not (images / name).is_dir():
            raise DataError(f"cub: class folder {images / name} is missing; the dataset in "
                            f"{root.resolve()} is incomplete. Prepare it again with: "
                            f"{PREPARE_HINT.format(name='cub', root=root)}")
    return ImageFileSplit("cub", split, classes, [image_files(images / name) for name in classes])


CUB_LAYOUTS = [
    Layout("archive", "CUB_200_2011/images/<class>/*.jpg (CUB_200_2011.tgz extracted)",
           _cub_images, open_cub),
]


# ---------------------------------------------------------------------------------------------
# Stanford Cars

# The Cars annotation files hold one record per image (16,185 in all); a variable declaring more
# elements than this is not an annotation, and loading it would allocate what it declares.
MAX_MAT_ELEMENTS = 10**6
Annotation = tuple[Path, tuple[int, int, int, int], int]  # image file, crop box, 1-based class


def _loadmat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat, whosmat

    try:
        declared = whosmat(str(path))  # names and shapes from the headers; no data is read
        for name, shape, _ in declared:
            if int(np.prod(shape, dtype=np.float64)) > MAX_MAT_ELEMENTS:
                raise DataError(f"annotation file {path}: variable {name!r} declares shape "
                                f"{shape}, more than the {MAX_MAT_ELEMENTS:,} elements an "
                                "annotation holds")
        return loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except DataError:
        raise
    except Exception as err:  # scipy raises many types (ValueError, MatReadError, OSError, ...)
        raise DataError(f"annotation file {path} is corrupt or not a MATLAB file ({err})") from err


def _class_names(mat: dict[str, Any], path: Path) -> list[str]:
    """The `class_names` of an annotation file, as strings."""
    names = mat.get("class_names", [])
    if isinstance(names, str) or not hasattr(names, "__iter__"):
        raise DataError(f"annotation file {path}: class_names is {type(names).__name__}, not a "
                        "list of class names")
    return [str(n) for n in names]


def _annotated(mat: dict[str, Any], path: Path, folder: Path, file_field: str) -> list[Annotation]:
    """The Annotation of each record of the annotation file `path`; a file outside `folder` or a
    record without those fields is refused, naming the file and record."""
    if "annotations" not in mat:
        raise DataError(f"annotation file {path} has no 'annotations' (keys: "
                        f"{sorted(k for k in mat if not k.startswith('__'))})")
    records = mat["annotations"]
    images = []
    for k, r in enumerate([records] if not hasattr(records, "__len__") else records):
        where = f"annotation file {path}, record {k + 1}"
        try:
            file = inside(folder, str(getattr(r, file_field)), where)
            box = (int(r.bbox_x1), int(r.bbox_y1), int(r.bbox_x2), int(r.bbox_y2))
            images.append((file, box, int(getattr(r, "class"))))
        except (AttributeError, TypeError, ValueError) as err:
            raise DataError(f"{where} is not an image annotation ({err})") from err
    return images


def _cars_annos(root: Path, split: str) -> Optional[Path]:
    mat = root / "cars_annos.mat"
    return mat if mat.is_file() and (root / "car_ims").is_dir() else None


def _cars_devkit(root: Path, split: str) -> Optional[Path]:
    needed = [root / "devkit" / "cars_meta.mat", root / "devkit" / "cars_train_annos.mat",
              root / "cars_test_annos_withlabels.mat", root / "cars_train", root / "cars_test"]
    return root if all(p.exists() for p in needed) else None


def _cars_split(root: Path, split: str, class_names: list[str], images: list[Annotation]
                ) -> FewShotSplit:
    """Group the annotated images by the shipped class split of Cars."""
    wanted = class_split("cars")[split]
    index = {name: k for k, name in enumerate(class_names)}
    unknown = [name for name in wanted if name not in index]
    if unknown:
        raise DataError(f"cars: class {unknown[0]!r} of the shipped {split} split is not among the "
                        f"{len(class_names)} class names of the annotations in {root}")
    position = {index[name] + 1: k for k, name in enumerate(wanted)}
    files: list[list[Path]] = [[] for _ in wanted]
    boxes: list[list[tuple[int, int, int, int]]] = [[] for _ in wanted]
    for path, box, label in images:
        if label in position:
            files[position[label]].append(path)
            boxes[position[label]].append(box)
    return ImageFileSplit("cars", split, wanted, files, boxes=boxes)


def open_cars_annos(root: Path, split: str, path: Path) -> FewShotSplit:
    mat = _loadmat(path)
    return _cars_split(root, split, _class_names(mat, path),
                       _annotated(mat, path, root, "relative_im_path"))


def open_cars_devkit(root: Path, split: str, found: Path) -> FewShotSplit:
    meta = root / "devkit" / "cars_meta.mat"
    names, images = _class_names(_loadmat(meta), meta), []
    for path, folder in ((root / "devkit" / "cars_train_annos.mat", root / "cars_train"),
                         (root / "cars_test_annos_withlabels.mat", root / "cars_test")):
        images += _annotated(_loadmat(path), path, folder, "fname")
    return _cars_split(root, split, names, images)


CARS_LAYOUTS = [
    Layout("annos", "cars_annos.mat + car_ims/*.jpg (car_ims.tgz extracted)",
           _cars_annos, open_cars_annos),
    Layout("devkit", "devkit/cars_meta.mat + devkit/cars_train_annos.mat + cars_train/ + "
           "cars_test_annos_withlabels.mat + cars_test/ (car_devkit.tgz, cars_train.tgz, "
           "cars_test.tgz extracted)", _cars_devkit, open_cars_devkit),
]


# ---------------------------------------------------------------------------------------------
# Omniglot

OMNIGLOT_SETS = ("images_background", "images_evaluation")
# Characters per split (torchmeta's 1028/172/423 of the 1623); taken in order: background
# alphabets first, then evaluation ones, each sorted by alphabet and character.
OMNIGLOT_SPLIT = {"train": 1028, "val": 172, "test": 423}


def _omniglot_folder(root: Path, split: str) -> Optional[Path]:
    folders = (root, root / "omniglot-py", root / "omniglot")
    return next((f for f in folders if all((f / s).is_dir() for s in OMNIGLOT_SETS)), None)


def open_omniglot(root: Path, split: str, folder: Path, rotations: bool) -> FewShotSplit:
    characters = []
    for subset in OMNIGLOT_SETS:
        for alphabet in sorted(p for p in visible_entries(folder / subset) if p.is_dir()):
            characters += sorted(p for p in visible_entries(alphabet) if p.is_dir())
    # [start, end) of each split among the characters, in the 1028/172/423 proportions
    full = sum(OMNIGLOT_SPLIT.values())
    n_train = round(len(characters) * OMNIGLOT_SPLIT["train"] / full)
    n_val = round(len(characters) * OMNIGLOT_SPLIT["val"] / full)
    start, end = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                  "test": (n_train + n_val, len(characters))}[split]
    chosen = characters[start:end]
    quarters = range(4) if rotations else range(1)
    names = [f"{c.parent.name}/{c.name}" + (f"/rot{90 * q}" if rotations else "")
             for q in quarters for c in chosen]
    files = [sorted(p for p in visible_entries(c) if p.suffix.lower() == ".png")
             for _ in quarters for c in chosen]
    return ImageFileSplit("omniglot", split, names, files, channels=1, native_size=28,
                          normalize=False, invert=True,
                          rotations=[q for q in quarters for _ in chosen] if rotations else None)


def omniglot_layouts(rotations: bool) -> list[Layout]:
    """Omniglot's layouts; `rotations` adds the 90/180/270-degree turns as classes."""
    return [Layout("folders", "images_background/<alphabet>/<character>/*.png + "
                   "images_evaluation/... (the two zips extracted)", _omniglot_folder,
                   lambda root, split, folder: open_omniglot(root, split, folder, rotations))]
