"""Your own few-shot dataset: root/{train,val,test}/<class>/<image files>, of any size and mode.

The classes of a split are its sub-folders, sorted by name; the images of a class are its image
files, sorted by name. Hidden entries (names starting with '.', such as .ipynb_checkpoints) are
neither classes nor images, and other files are ignored. Images are decoded when an episode needs
them, converted to RGB or to one grey channel (data.grayscale, whatever the file's mode: palette,
RGBA, 16-bit grey, CMYK) and resized to data.image_size by the episode transform.
"""

from __future__ import annotations

from pathlib import Path

from .base import DataError, ImageFileSplit, visible_entries

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "val", "test")
LAYOUT = "<root>/{train,val,test}/<class>/<image files: " + " ".join(IMAGE_SUFFIXES) + ">"


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
    classes = sorted(p.name for p in visible_entries(folder) if p.is_dir())
    if not classes:
        raise DataError(f"folder dataset: {folder.resolve()} holds no class folders (expected "
                        f"{folder}/<class>/<image files>)")
    files = [sorted(p for p in visible_entries(folder / name)
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) for name in classes]
    empty = [name for name, found in zip(classes, files) if not found]
    if empty:
        raise DataError(f"folder dataset: class folder {(folder / empty[0]).resolve()} holds no "
                        f"image files ({' '.join(IMAGE_SUFFIXES)}); {len(empty)} class folder(s) "
                        f"of {split} are empty")
    # Normalisation is set by data.normalize afterwards (normalization.configure_normalization).
    return ImageFileSplit("folder", split, classes, files, channels=channels,
                          native_size=image_size, normalize=False)
