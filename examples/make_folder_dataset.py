"""Write a small few-shot dataset in the folder layout, to try data.name=folder on.

    python examples/make_folder_dataset.py data/glyph_folder
    python train.py data.name=folder data.root=data/glyph_folder data.image_size=32

The classes are glyphs of the built-in synthetic dataset, saved as image files the way a dataset
of your own comes: root/{train,val,test}/<class>/*.png|jpg, each image of its own size (24-48
pixels), its own ink colour and its own file format and mode (RGB or grey PNG, RGB JPEG, RGBA PNG).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from sparse_maml.data.synthetic import generate_glyph_class


def write_folder_dataset(root: Path, classes: dict[str, int], per_class: int, seed: int = 0) -> None:
    """root/<split>/<class>/<image> for `classes[split]` glyph classes of `per_class` images."""
    rng = np.random.default_rng(seed)
    for split, count in classes.items():
        for label in range(count):
            folder = root / split / f"glyph_{label:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            ink = generate_glyph_class(split, seed, label, per_class, size=48)  # (n, 1, 48, 48) uint8
            for i, image in enumerate(ink[:, 0].numpy()):
                colour = rng.integers(0, 256, 3)  # colour carries no class information
                alpha = image[:, :, None].astype(np.float32) / 255
                rgb = (255 * (1 - alpha) + colour * alpha).round().astype(np.uint8)
                side = int(rng.integers(24, 49))
                picture = Image.fromarray(rgb).resize((side, side), Image.BILINEAR)
                kind = i % 4
                if kind == 0:
                    picture.save(folder / f"{i:03d}.png")
                elif kind == 1:
                    picture.convert("L").save(folder / f"{i:03d}.png")
                elif kind == 2:
                    picture.save(folder / f"{i:03d}.jpg", quality=95)
                else:
                    picture.convert("RGBA").save(folder / f"{i:03d}.png")
    # What notebooks and file browsers leave behind is not a class.
    (root / "train" / ".ipynb_checkpoints").mkdir(exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("root", type=Path, help="folder to write the dataset into")
    parser.add_argument("--classes", type=int, nargs=3, default=(64, 16, 32),
                        metavar=("TRAIN", "VAL", "TEST"), help="classes per split")
    parser.add_argument("--per-class", type=int, default=20, help="images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    classes = dict(zip(("train", "val", "test"), args.classes))
    write_folder_dataset(args.root, classes, args.per_class, args.seed)
    print(f"wrote {sum(classes.values())} classes x {args.per_class} images to {args.root}")


if __name__ == "__main__":
    main()
