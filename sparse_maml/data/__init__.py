"""Few-shot datasets, seeded episodes and the transforms between them.

`build_split(data_cfg, split)` opens one split of the configured dataset (detecting its on-disk
layout, preparing it first when `data.download` is set); `build_episodes` turns it into seeded
episodes, gathered from disk per episode or, with `data.on_device`, from one uint8 tensor on the
accelerator.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from .base import DataError, FewShotSplit, Task
from .folder import open_folder
from .normalization import (TrainStatistics, apply_input_record, check_input_record,
                            configure_normalization, input_record, normalization_statistics)
from .episodes import (DeviceEpisodeDataset, EpisodeDataset, EpisodePlan, check_episode_sizes,
                       episode_loader, stack_tasks, task_seed)
from .imagenet import MINI_LAYOUTS, TIERED_LAYOUTS
from .layouts import Layout, locate, resolve
from .photos import CARS_LAYOUTS, CUB_LAYOUTS, omniglot_layouts
from .synthetic import SyntheticGlyphs
from .transforms import EpisodeTransform

SPLITS = ("train", "val", "test")


# data.name -> (omniglot_rotations) -> the layouts that dataset can be read from, fastest first.
# (synthetic is generated and folder is your own: build_split opens those two directly.)
DATASETS: dict[str, Callable[[bool], list[Layout]]] = {
    "miniimagenet": lambda rotations: MINI_LAYOUTS,
    "tieredimagenet": lambda rotations: TIERED_LAYOUTS,
    "cub": lambda rotations: CUB_LAYOUTS,
    "cars": lambda rotations: CARS_LAYOUTS,
    "omniglot": omniglot_layouts,
}


def dataset_layouts(name: str, omniglot_rotations: bool = False) -> list[Layout]:
    """The layouts `name` can be read from, fastest first."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose synthetic or one of "
                        f"{', '.join(DATASETS)}")
    return DATASETS[name](omniglot_rotations)


def open_split(name: str, root: str | Path, split: str, layout: str = "auto",
               omniglot_rotations: bool = False) -> FewShotSplit:
    """Split `split` of dataset `name` stored under `root` (layout detected unless forced)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return resolve(name, Path(root), split, dataset_layouts(name, omniglot_rotations), layout)


def build_split(data, split: str, normalized: bool = True) -> FewShotSplit:
    """The FewShotSplit named by a DataConfig (`data.name`, `data.root`, `data.layout`), normalised
    as `data.normalize` asks. `normalized=False` leaves the normalisation unset, so no train
    statistics are computed (they decode every train image and stop at the first bad one)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data.name == "synthetic":
        opened = SyntheticGlyphs(split, seed=data.synthetic_seed)
    elif data.name == "folder":
        opened = open_folder(data.root, split, 1 if data.grayscale else 3, data.image_size)
    else:
        try:
            opened = open_split(data.name, data.root, split, data.layout, data.omniglot_rotations)
        except DataError:
            if not data.download:
                raise
            from .download import prepare

            prepare(data.name, data.root, partial(open_split, data.name))
            opened = open_split(data.name, data.root, split, data.layout, data.omniglot_rotations)
    return configure_normalization(opened, data) if normalized else opened


def check_present(data, split: str) -> None:
    """Raise DataError (naming the root and the layouts) unless `split` of the dataset a DataConfig
    names is on disk; reads no image. A dataset still to be downloaded (data.download) passes."""
    if data.name == "synthetic" or data.download:
        return
    if data.name == "folder":  # lists the class folders and their files
        open_folder(data.root, split, 1 if data.grayscale else 3, data.image_size)
        return
    locate(data.name, Path(data.root), split, dataset_layouts(data.name, data.omniglot_rotations),
           data.layout)


class BadImages(NamedTuple):
    """What find_bad_images found: how many images fail, and the messages of the first few."""

    count: int
    first: list[str]  # one message per image, each naming the file; at most `limit` of them


def find_bad_images(split: FewShotSplit, report=None, limit: int = 20) -> BadImages:
    """Decode every image of `split` once; count those that fail and keep the messages (each
    naming the file) of the first `limit`. `report(done, total)` is called after each class."""
    count, first, total = 0, [], split.num_classes
    for label in range(total):
        for index in range(split.class_size(label)):
            try:
                split.load(label, index)
            except DataError as err:
                count += 1
                if len(first) < limit:
                    first.append(str(err))
        if report is not None:
            report(label + 1, total)
    return BadImages(count, first)


def default_device() -> torch.device:
    """The accelerator if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_episodes(data, split: FewShotSplit, seed: int, augment: bool,
                   device: Optional[torch.device | str] = None,
                   num_query: Optional[int] = None) -> EpisodeDataset:
    """Episodes of `split` as configured by a DataConfig, with `num_query` query images per class
    if given (data.test_query). With `data.on_device` the split is copied once into a uint8 tensor
    on `device` (default: the accelerator if any) and gathered there, giving the same episodes."""
    transform = EpisodeTransform(data.image_size or split.native_size, split.channels,
                                 split.normalize, augment, split.mean, split.std)
    sizes = (data.num_ways, data.num_shots, data.num_query if num_query is None else num_query)
    if getattr(data, "on_device", False):
        return DeviceEpisodeDataset(split, *sizes, seed, transform, device or default_device())
    return EpisodeDataset(split, *sizes, seed, transform)


__all__ = ["DATASETS", "BadImages", "DataError", "DeviceEpisodeDataset", "EpisodeDataset",
           "EpisodePlan", "EpisodeTransform", "FewShotSplit", "SPLITS", "SyntheticGlyphs", "Task",
           "TrainStatistics", "apply_input_record", "build_episodes", "build_split",
           "check_episode_sizes", "check_input_record", "check_present", "dataset_layouts",
           "default_device", "episode_loader", "find_bad_images", "input_record",
           "normalization_statistics", "open_split", "stack_tasks", "task_seed"]
