"""Your own few-shot dataset: root/{train,val,test}/<class>/<image files>, of any size and mode.

The classes of a split are its sub-folders, sorted by name; the images of a class are its image
files, sorted by name. Hidden entries (names starting with '.', such as .ipynb_checkpoints) are
neither classes nor images, and other files are ignored. Images are decoded when an episode needs
them, converted to RGB or to one grey channel (data.grayscale, whatever the file's mode: palette,
RGBA, 16-bit grey, CMYK) and resized to data.image_size by the episode transform.
"""

from __future__ import annotations

from pathlib import Path

from .base import DataError, ImageFileSplit

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
LAYOUT = "<root>/{train,val,test}/<class>/<image files: " + " ".join(IMAGE_SUFFIXES) + ">"


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted by name (hidden and other files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_folder(root: str | Path, split: str, channels: int, image_size: int) -> ImageFileSplit:
    """Split `split` of the dataset in `root`, read as `channels` (1 or 3) channels."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder dataset: data.root={root} is not a folder (expected {LAYOUT})")
    folder = root / split
    if not folder.is_dir():
        found = [s for s in SPLIT_FOLDERS if (root / s).is_dir()]
        raise DataError(f"folder dataset {root.resolve()}: the {split} split folder {folder} is "
                        f"missing (found: {', '.join(found) or 'none'}; expected {LAYOUT})")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DataError(f"folder dataset: {folder.resolve()} holds no class folders (expected "
                        f"{folder}/<class>/<image files>)")
    files = [image_files(folder / name) for name in classes]
    empty = [name for name, found in zip(classes, files) if not found]
    if empty:
        raise DataError(f"folder dataset: class folder {(folder / empty[0]).resolve()} holds no image "
                        f"files ({' '.join(IMAGE_SUFFIXES)}); {len(empty)} class folder(s) of "
                        f"{split} are empty")
    # Normalisation is set by data.normalize afterwards (normalization.configure_normalization).
    return ImageFileSplit("folder", split, classes, files, channels=channels,
                          native_size=image_size, normalize=False)
