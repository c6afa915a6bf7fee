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
from typing import Iterable, Iterator, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .base import DataError, FewShotSplit, Task
from .transforms import AugmentParams, EpisodeTransform, resize


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
        self.split = split
        self.num_ways, self.num_shots, self.num_query = num_ways, num_shots, num_query
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        # Episodes are drawn, not enumerated; samplers pass the indices they want.
        return 2**62

    def plan(self, index: int) -> EpisodePlan:
        """Classes, images and augmentation of episode `index`, from its own generator alone."""
        g = torch.Generator().manual_seed(task_seed(self.seed, self.split.split, int(index)))
        classes = torch.randperm(self.split.num_classes, generator=g)[: self.num_ways].tolist()
        per_class = self.num_shots + self.num_query
        picks, params = [], []
        for label in classes:  # label order = draw order, so labels are assigned at random
            chosen = torch.randperm(self.split.class_size(label), generator=g)[:per_class].tolist()
            picks.append(chosen)
            params += [self.transform.draw(g) for _ in chosen]
        return EpisodePlan(classes, picks, params if self.transform.augment else None)

    def _labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(self.num_ways)
        return labels.repeat_interleave(self.num_shots), labels.repeat_interleave(self.num_query)

    def _split_support_query(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ways*(shots+query), C, H, W) grouped by class -> support and query, grouped by class."""
        per_class = images.view(self.num_ways, self.num_shots + self.num_query, *images.shape[1:])
        support = per_class[:, : self.num_shots].reshape(-1, *images.shape[1:])
        query = per_class[:, self.num_shots:].reshape(-1, *images.shape[1:])
        return support, query

    def __getitem__(self, index: int) -> Task:
        plan = self.plan(index)
        raw = []
        for label, chosen in zip(plan.classes, plan.picks):
            raw += self.split.load_many(label, chosen)
        params = plan.augment or [None] * len(raw)
        images = torch.stack([self.transform.apply(im, p) for im, p in zip(raw, params)])
        support_x, query_x = self._split_support_query(images)  # (ways*shots, C, H, W), ...
        support_y, query_y = self._labels()
        return Task(support_x, support_y, query_x, query_y)


def check_episode_sizes(split: FewShotSplit, num_ways: int, num_shots: int, num_query: int) -> None:
    """Fail at start-up, with the numbers, if `split` cannot give num_ways-way episodes."""
    per_class = num_shots + num_query
    if split.num_classes < num_ways:
        raise DataError(f"{split.name}/{split.split} has {split.num_classes} classes, fewer than "
                        f"data.num_ways={num_ways}")
    small = [c for c in range(split.num_classes) if split.class_size(c) < per_class]
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

    Episode `index` has the same classes, images, label order and augmentation choices as in
    EpisodeDataset (the plan is drawn the same way on the CPU); only the gather, resize, augmentation
    and normalisation run on the device, for all tasks of a batch at once. Images whose stored size
    differs from the target size are resized once, when the split is loaded, and rounded to uint8.
    """

    on_device = True

    def __init__(self, split: FewShotSplit, num_ways: int, num_shots: int, num_query: int,
                 seed: int, transform: EpisodeTransform, device: torch.device | str):
        super().__init__(split, num_ways, num_shots, num_query, seed, transform)
        self.device = torch.device(device)
        sizes = [split.class_size(c) for c in range(split.num_classes)]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        size = transform.size
        images = torch.empty(self.offsets[-1], split.channels, size, size, dtype=torch.uint8,
                             device=self.device)  # (all images of the split, C, S, S)
        for label in range(split.num_classes):
            for start in range(0, sizes[label], 256):
                chunk = split.load_many(label, list(range(start, min(start + 256, sizes[label]))))
                chunk = torch.stack([_to_size(im, size) for im in chunk])  # (n, C, S, S) uint8
                row = self.offsets[label] + start
                images[row:row + len(chunk)] = chunk.to(self.device)
        self.images = images

    def rows(self, plan: EpisodePlan) -> list[int]:
        """Rows of `self.images` of an episode, class by class."""
        return [self.offsets[c] + i for c, chosen in zip(plan.classes, plan.picks) for i in chosen]

    def batch(self, indices: list[int] | range) -> Task:
        """Episodes `indices` stacked into one Task on the device."""
        plans = [self.plan(i) for i in indices]
        rows = torch.tensor([r for p in plans for r in self.rows(p)], device=self.device)
        params = None if not self.transform.augment else [q for p in plans for q in p.augment]
        images = self.transform.apply_batch(self.images.index_select(0, rows), params)
        per_task = images.view(len(plans), -1, *images.shape[1:])  # (tasks, ways*(shots+query), C, S, S)
        parts = [self._split_support_query(t) for t in per_task]
        support_y, query_y = (y.to(self.device) for y in self._labels())
        n = len(plans)
        return Task(torch.stack([s for s, _ in parts]), support_y.expand(n, -1).contiguous(),
                    torch.stack([q for _, q in parts]), query_y.expand(n, -1).contiguous())

    def __getitem__(self, index: int) -> Task:
        return self.batch([index]).select(0)


class DeviceEpisodeLoader:
    """Batches of on-device episodes first_index .. first_index+num_tasks-1, built in this process."""

    def __init__(self, dataset: DeviceEpisodeDataset, first_index: int, num_tasks: int,
                 tasks_per_batch: int):
        self.dataset = dataset
        self.indices = range(first_index, first_index + num_tasks)
        self.tasks_per_batch = tasks_per_batch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.tasks_per_batch)

    def __iter__(self) -> Iterator[Task]:
        for start in range(0, len(self.indices), self.tasks_per_batch):
            yield self.dataset.batch(self.indices[start:start + self.tasks_per_batch])


def stack_tasks(tasks: list[Task]) -> Task:
    """Collate episodes into one Task with a leading task dimension."""
    return Task(*(torch.stack(parts) for parts in zip(*tasks)))


def episode_loader(dataset: EpisodeDataset, first_index: int, num_tasks: int, tasks_per_batch: int,
                   num_workers: int = 0, pin_memory: bool = False) -> Iterable[Task]:
    """Batches of the episodes first_index .. first_index+num_tasks-1, in order.

    On-device datasets are batched in this process (workers and pinning would only add copies).
    """
    if dataset.on_device:
        return DeviceEpisodeLoader(dataset, first_index, num_tasks, tasks_per_batch)
    return DataLoader(
        dataset,
        sampler=range(first_index, first_index + num_tasks),
        batch_size=tasks_per_batch,
        collate_fn=stack_tasks,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
