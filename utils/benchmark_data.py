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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sparse_maml.config import DataConfig  # noqa: E402
from sparse_maml.data import (DataError, build_episodes, build_split, default_device,  # noqa: E402
                               episode_loader)
from sparse_maml.data.fixtures import make_miniimagenet, write_miniimagenet  # noqa: E402
from sparse_maml.runtime import error_message  # noqa: E402


def time_mode(cfg: DataConfig, split_name: str, tasks: int, batch: int, workers: int,
              augment: bool, device: torch.device) -> tuple[float, float]:
    """(seconds to set up, episodes per second) of one configuration, on a warm loader."""
    start = time.perf_counter()
    split = build_split(cfg, split_name)
    episodes = build_episodes(cfg, split, seed=0, augment=augment, device=device)
    setup = time.perf_counter() - start
    pin = device.type == "cuda" and not cfg.on_device
    for task in episode_loader(episodes, 0, batch, batch, 0):  # warm-up (caches, kernels)
        task.to(device)
    start = time.perf_counter()
    for task in episode_loader(episodes, batch, tasks, batch, workers, pin_memory=pin):
        task = task.to(device, non_blocking=pin)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return setup, tasks / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="", help="a real MiniImageNet (any layout); default: generate")
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
            modes["device"] = dataclasses.replace(base, root=args.root, on_device=True)
        else:
            data = make_miniimagenet(classes=(10, 5, 5), per_class=args.shots + args.query + 4)
            modes = {}
            for name, layout in (("disk-jpeg", "csv"), ("disk-npy", "npy"), ("memory", "pickle")):
                root = write_miniimagenet(Path(tmp) / layout, layout, data)
                modes[name] = dataclasses.replace(base, root=str(root), layout=layout)
            modes["device"] = dataclasses.replace(modes["memory"], on_device=True)
        print(f"{args.ways}-way {args.shots}-shot {args.query}-query, batches of {args.batch}, "
              f"{args.workers} workers, augment={args.augment}, device mode on {device}")
        for name, cfg in modes.items():
            try:
                setup, rate = time_mode(cfg, args.split, args.tasks, args.batch,
                                        0 if cfg.on_device else args.workers, args.augment,
                                        device if cfg.on_device else torch.device("cpu"))
            except DataError as err:  # --root holds a missing, corrupt or refused dataset
                print(f"error: {error_message(err)}", file=sys.stderr)
                return 1
            print(f"  {name:24s} {rate:8.1f} episodes/s   (setup {setup:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
