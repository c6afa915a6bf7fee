"""Seeded N-way K-shot episodes.

Task `index` of a split is drawn from a generator seeded by (seed, split, index) alone, so the same
triple always gives the same classes, images, label order and augmentation, whatever the number of
DataLoader workers or processes. Training draws task indices step*meta_batch + j (a fresh stream);
validation and test use the fixed indices 0..n-1.

An episode is first *planned* (classes, image indices, augmentation choices: every draw from the
generator, in a fixed order) and then *built* from the images. The plan is the same for the lazy
path (EpisodeDataset, images read per episode) and the on-device path (DeviceEpisodeDataset, the
split held as one uint8 tensor on the accelerator), so both give the same episodes.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Iterable, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .base import DataError, FewShotSplit, Task
from .transforms import AugmentParams, EpisodeTransform, draw_augment, resize


def task_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed that depends only on (seed, split, index)."""
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class EpisodePlan(NamedTuple):
    """Every random choice of one episode, drawn before any image is read."""

    classes: list[int]  # split labels; episode label i is classes[i]
    picks: list[list[int]]  # per class: shots + query image indices within the class
    augment: Optional[list[AugmentParams]]  # per image, class by class (None: no augmentation)


class EpisodeDataset(Dataset):
    """Item `index` is one N-way episode of `split`; any non-negative index is valid."""

    on_device = False

    def __init__(self, split: FewShotSplit, num_ways: int, num_shots: int, num_query: int,
                 seed: int, transform: EpisodeTransform):
        check_episode_sizes(split, num_ways, num_shots, num_query)
        self.split, self.seed, self.transform = split, seed, transform
        self.num_ways, self.num_shots, self.num_query = num_ways, num_shots, num_query

    def __len__(self) -> int:
        return 2**62  # episodes are drawn, not enumerated; samplers pass the indices they want

    def plan(self, index: int) -> EpisodePlan:
        """Classes, images and augmentation of episode `index`, from its own generator alone."""
        g = torch.Generator().manual_seed(task_seed(self.seed, self.split.split, int(index)))
        classes = torch.randperm(self.split.num_classes, generator=g)[: self.num_ways].tolist()
        per_class = self.num_shots + self.num_query
        picks, params = [], []
        for label in classes:  # label order = draw order, so labels are assigned at random
            chosen = torch.randperm(self.split.class_size(label), generator=g)[:per_class].tolist()
            picks.append(chosen)
            if self.transform.augment:
                params += [draw_augment(g) for _ in chosen]
        return EpisodePlan(classes, picks, params if self.transform.augment else None)

    def _task(self, images: torch.Tensor) -> Task:
        """Images (..., ways*(shots+query), C, H, W), class by class -> Task, same leading dims."""
        sizes = [self.num_shots, self.num_query]
        lead, shape = images.shape[:-4], images.shape[-3:]
        parts = images.view(*lead, self.num_ways, sum(sizes), *shape).split(sizes, dim=-4)
        x = [part.reshape(*lead, -1, *shape) for part in parts]
        labels = torch.arange(self.num_ways, device=images.device).expand(*lead, -1)
        y = [labels.repeat_interleave(n, dim=-1) for n in sizes]
        return Task(x[0], y[0], x[1], y[1])

    def __getitem__(self, index: int) -> Task:
        plan = self.plan(index)
        raw = [image for label, chosen in zip(plan.classes, plan.picks)
               for image in self.split.load_many(label, chosen)]
        params = plan.augment or [None] * len(raw)
        return self._task(torch.stack([self.transform.apply(im, p) for im, p in zip(raw, params)]))


def check_episode_sizes(split: FewShotSplit, num_ways: int, num_shots: int, num_query: int) -> None:
    """Fail at start-up, with the numbers, if `split` cannot give num_ways-way episodes."""
    if split.num_classes < num_ways:
        raise DataError(f"{split.name}/{split.split} has {split.num_classes} classes, fewer than "
                        f"data.num_ways={num_ways}")
    small = [c for c in range(split.num_classes) if split.class_size(c) < num_shots + num_query]
    if small:
        raise DataError(
            f"{split.name}/{split.split}: class {small[0]} ({split.class_name(small[0])}) has "
            f"{split.class_size(small[0])} images, fewer than data.num_shots + data.num_query = "
            f"{num_shots} + {num_query} ({len(small)} classes are that small)")


def _to_size(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, size, size), resized as the transform does, then rounded."""
    if image.shape[-2:] == (size, size):
        return image
    return (resize(image[None].float() / 255.0, size)[0] * 255.0).round().to(torch.uint8)


class DeviceEpisodeDataset(EpisodeDataset):
    """Episodes gathered from a whole split held as one uint8 tensor on `device` (data.on_device).

    The plans are EpisodeDataset's (drawn on the CPU), so the episodes are the same; the gather,
    augmentation and normalisation run on the device, for all tasks of a batch at once. Images of
    another size than the target are resized once, when the split is loaded, and rounded to uint8.
    """

    on_device = True

    def __init__(self, split: FewShotSplit, num_ways: int, num_shots: int, num_query: int,
                 seed: int, transform: EpisodeTransform, device: torch.device | str):
        super().__init__(split, num_ways, num_shots, num_query, seed, transform)
        self.device = torch.device(device)
        sizes = [split.class_size(c) for c in range(split.num_classes)]
        self.offsets = [0, *itertools.accumulate(sizes)]
        size = transform.size
        self.images = torch.empty(self.offsets[-1], split.channels, size, size, dtype=torch.uint8,
                                  device=self.device)  # (all images of the split, C, S, S)
        for label, count in enumerate(sizes):
            for start in range(0, count, 256):
                chunk = split.load_many(label, list(range(start, min(start + 256, count))))
                row = self.offsets[label] + start
                self.images[row:row + len(chunk)] = torch.stack(
                    [_to_size(im, size) for im in chunk]).to(self.device)

    def batch(self, indices: list[int] | range) -> Task:
        """Episodes `indices` stacked into one Task on the device."""
        plans = [self.plan(i) for i in indices]
        rows = [self.offsets[c] + i for p in plans for c, chosen in zip(p.classes, p.picks)
                for i in chosen]
        params = [q for p in plans for q in p.augment] if self.transform.augment else None
        selected = self.images.index_select(0, torch.tensor(rows, device=self.device))
        images = self.transform.apply_batch(selected, params)
        return self._task(images.view(len(plans), -1, *images.shape[1:]))

    def __getitem__(self, index: int) -> Task:
        return self.batch([index]).select(0)


def stack_tasks(tasks: list[Task]) -> Task:
    """Collate episodes into one Task with a leading task dimension."""
    return Task(*(torch.stack(parts) for parts in zip(*tasks)))


def episode_loader(dataset: EpisodeDataset, first_index: int, num_tasks: int, tasks_per_batch: int,
                   num_workers: int = 0, pin_memory: bool = False) -> Iterable[Task]:
    """Batches of the episodes first_index .. first_index+num_tasks-1, in order.

    On-device datasets are batched in this process (workers and pinning would only add copies).
    """
    indices = range(first_index, first_index + num_tasks)
    if dataset.on_device:
        return (dataset.batch(indices[i:i + tasks_per_batch])
                for i in range(0, num_tasks, tasks_per_batch))
    return DataLoader(dataset, sampler=indices, batch_size=tasks_per_batch, collate_fn=stack_tasks,
                      num_workers=num_workers, pin_memory=pin_memory)
