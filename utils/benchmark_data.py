"""Episodes per second of each loading mode: lazy from disk, in memory, and on the device.

    python utils/benchmark_data.py                          # a generated tiny MiniImageNet, seconds
    python utils/benchmark_data.py --root data/miniimagenet --tasks 200 --workers 4

Modes: `disk-jpeg` (csv layout, one JPEG decoded per image), `disk-npy` (prepared memory-mapped
array), `memory` (pickle layout, the split in RAM), `device` (data.on_device: one uint8 tensor on
the accelerator, episodes gathered there; the CPU when there is no GPU). With --root only the
layout found there and the device mode are timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparse_maml.config import DataConfig
from sparse_maml.data import (DataError, build_episodes, build_split, default_device,
                               episode_loader)
from sparse_maml.data.imagenet import write_npy
from sparse_maml.runtime import error_message


def write_random_miniimagenet(root: Path, per_class: int, size: int = 84) -> dict[str, Path]:
    """A MiniImageNet of random JPEG pictures in three layouts; {layout: root}: csv (JPEG files
    and a CSV per split), npy (the arrays the loader maps) and pickle (one file per split)."""
    rng = np.random.default_rng(0)
    roots = {layout: root / layout for layout in ("csv", "npy", "pickle")}
    for folder in roots.values():
        folder.mkdir(parents=True)
    (roots["csv"] / "images").mkdir()
    first = 0
    for split, count in zip(("train", "val", "test"), (10, 5, 5)):
        names = [f"n{first + c:08d}" for c in range(count)]
        first += count
        lines, pixels = ["filename,label"], []
        for name in names:
            per_image = []
            for k in range(per_class):
                coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
                filename = f"{name}{k + 1:08d}.jpg"
                image.save(roots["csv"] / "images" / filename, quality=90)
                lines.append(f"{filename},{name}")
                with Image.open(roots["csv"] / "images" / filename) as decoded:
                    per_image.append(np.asarray(decoded.convert("RGB")))
            pixels.append(np.stack(per_image))
        (roots["csv"] / f"{split}.csv").write_text("\n".join(lines) + "\n")
        offsets = np.cumsum([0] + [len(p) for p in pixels])
        write_npy(roots["npy"], split, names, pixels, int(offsets[-1]), pixels[0].shape[1:])
        with open(roots["pickle"] / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": np.concatenate(pixels),
                         "class_dict": {n: list(range(offsets[k], offsets[k + 1]))
                                        for k, n in enumerate(names)}}, f)
    return roots


def time_mode(cfg: DataConfig, args: argparse.Namespace,
              device: torch.device) -> tuple[float, float]:
    """(seconds to set up, episodes per second) of one mode, on a warm loader: the device mode on
    `device`, the lazy modes on the CPU with --workers."""
    workers, device = (0, device) if cfg.on_device else (args.workers, torch.device("cpu"))
    start = time.perf_counter()
    split = build_split(cfg, args.split)
    episodes = build_episodes(cfg, split, seed=0, augment=args.augment, device=device)
    setup = time.perf_counter() - start
    for task in episode_loader(episodes, 0, args.batch, args.batch, 0):  # warm-up (caches, kernels)
        task.to(device)
    start = time.perf_counter()
    for task in episode_loader(episodes, args.batch, args.tasks, args.batch, workers):
        task.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return setup, args.tasks / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="",
                        help="a real MiniImageNet (any layout); default: generate")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tasks", type=int, default=40, help="episodes timed per mode")
    parser.add_argument("--batch", type=int, default=4, help="episodes per loader batch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (lazy modes)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--augment", action="store_true", help="train augmentation on")
    parser.add_argument("--device", default="", help="device of the on-device mode (default: auto)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    base = DataConfig(name="miniimagenet", num_ways=args.ways, num_shots=args.shots,
                      num_query=args.query)
    with tempfile.TemporaryDirectory() as tmp:
        if args.root:
            modes = {"disk/memory (as found)": dataclasses.replace(base, root=args.root)}
        else:
            roots = write_random_miniimagenet(Path(tmp), per_class=args.shots + args.query + 4)
            modes = {name: dataclasses.replace(base, root=str(roots[layout]), layout=layout)
                     for name, layout in (("disk-jpeg", "csv"), ("disk-npy", "npy"),
                                          ("memory", "pickle"))}
        # the device mode reads what the last mode reads (the split in memory, with no --root)
        modes["device"] = dataclasses.replace(list(modes.values())[-1], on_device=True)
        print(f"{args.ways}-way {args.shots}-shot {args.query}-query, batches of {args.batch}, "
              f"{args.workers} workers, augment={args.augment}, device mode on {device}")
        for name, cfg in modes.items():
            try:
                setup, rate = time_mode(cfg, args, device)
            except DataError as err:  # --root holds a missing, corrupt or refused dataset
                print(f"error: {error_message(err)}", file=sys.stderr)
                return 1
            print(f"  {name:24s} {rate:8.1f} episodes/s   (setup {setup:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
