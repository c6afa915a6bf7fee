"""Shared helpers for the tests: tiny configs and random episodes."""

from __future__ import annotations

import torch

from sparse_maml.config import Config, load_config
from sparse_maml.data import Task

# A model and run small enough that a full train.py run takes seconds on a laptop CPU.
TINY = [
    "model.widths=[4,4,4,4]", "data.num_query=2", "train.epochs=2", "train.batches_per_epoch=3",
    "train.val_every=1", "train.num_val_tasks=4", "train.num_test_tasks=6",
    "train.eval_batch_size=3", "inner.steps=2", "inner.eval_steps=2", "outer.meta_batch_size=2",
    "run.tensorboard=false", "run.progress=false",
]

# The smallest run that still writes every file of a run folder (config, metrics, checkpoints,
# best.pt): what the tests of received and bad inputs start from.
SMALLEST = ["model.widths=[2,2,2,2]", "data.num_ways=2", "data.num_query=1", "inner.steps=1",
            "inner.eval_steps=1", "outer.meta_batch_size=1", "train.epochs=1",
            "train.batches_per_epoch=2", "train.val_every=1", "train.num_val_tasks=2",
            "train.num_test_tasks=2", "train.eval_batch_size=2", "run.tensorboard=false",
            "run.progress=false", "run.device=cpu"]


def tiny_config(*overrides: str) -> Config:
    """The demo defaults shrunk by TINY, then `overrides`."""
    return load_config(None, TINY + list(overrides))


def random_tasks(tasks: int = 3, ways: int = 3, shots: int = 2, query: int = 4, size: int = 16,
                 channels: int = 1, seed: int = 1) -> Task:
    """A stack of tasks with Gaussian images and class-grouped labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Task(
        support_x=torch.randn(tasks, ways * shots, channels, size, size, generator=g),
        support_y=labels.repeat_interleave(shots).repeat(tasks, 1),
        query_x=torch.randn(tasks, ways * query, channels, size, size, generator=g),
        query_y=labels.repeat_interleave(query).repeat(tasks, 1),
    )
