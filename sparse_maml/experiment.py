"""An experiment: the data, the meta-learner and its optimizers that a Config describes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import distributed
from .checkpoint import TrainState, set_rng_states
from .config import Config, ConfigError
from .data import EpisodeDataset, build_episodes, build_split, input_record
from .evaluation import EVAL_SEED
from .meta_learner import MetaLearner, build_meta_learner
from .runtime import resolve_device, seed_everything

# outer.optimizer and outer.mask_optimizer: name -> (parameters, lr, momentum) -> optimizer.
OPTIMIZERS: dict[str, Callable[[list, float, float], torch.optim.Optimizer]] = {
    "adam": lambda params, lr, momentum: torch.optim.Adam(params, lr),
    # SGD with Nesterov momentum, as the reference
    "sgd": lambda params, lr, momentum: torch.optim.SGD(params, lr, momentum=momentum,
                                                        nesterov=momentum > 0),
}


@dataclass
class Experiment:
    """Everything a run needs, built from a Config."""

    config: Config
    device: torch.device
    learner: MetaLearner
    theta_optimizer: torch.optim.Optimizer
    mask_optimizer: Optional[torch.optim.Optimizer]
    train_episodes: EpisodeDataset
    val_episodes: EpisodeDataset
    inputs: dict  # how the run reads its inputs (data.input_record), saved in its checkpoints
    state: TrainState = field(default_factory=TrainState)
    # RNG states from a checkpoint, applied once the episode loader of the resumed epoch exists
    # (creating a DataLoader iterator draws from torch's generator, which the uninterrupted run
    # did before or after the checkpoint: see training.fit).
    pending_rng: Optional[dict] = None
    # The weights and optimizer states of the last meta-batch whose outer loss was finite: what the
    # NaN guard rolls back to (see training.guarded_step). None until one such meta-batch.
    last_good: Optional[dict] = None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """theta's optimizer, then phi's if phi is learned."""
        return [o for o in (self.theta_optimizer, self.mask_optimizer) if o is not None]

    def apply_pending_rng(self) -> None:
        """Restore the RNG states of the checkpoint this run resumed from, if not done yet."""
        if self.pending_rng is not None:
            set_rng_states(self.pending_rng)
            self.pending_rng = None


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device` (the machine's RAM for the CPU; 0 if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(config: Config, channels: int, image_size: int, device: torch.device) -> None:
    """Refuse (ConfigError) an image size whose meta-batch cannot fit in the device's memory.

    A lower bound: the float32 images of the larger of a meta-batch and an evaluation batch, and
    the first block's two activation maps (convolution and batch norm), each kept once; a real step
    needs several times more, so only a hopeless size is refused."""
    d = config.data
    per_task = d.num_ways * (d.num_shots + max(d.num_query, d.test_query))
    tasks = max(config.outer.meta_batch_size, config.train.eval_batch_size)
    needed = tasks * per_task * (channels + 2 * config.model.widths[0]) * image_size ** 2 * 4
    available = device_memory(device)
    if available and needed > available:
        raise ConfigError(
            f"data.image_size={image_size}: {tasks} tasks of {per_task} images need at least "
            f"{needed / 2**30:,.1f} GiB for the images and first-layer activations alone, more than "
            f"the {available / 2**30:,.1f} GiB of {device}; lower data.image_size, "
            "outer.meta_batch_size or train.eval_batch_size")


def build_experiment(config: Config, device: Optional[torch.device] = None) -> Experiment:
    """Data, meta-learner and optimizers; seeds everything first (every process alike)."""
    device = device or resolve_device(config.run.device)
    distributed.check_meta_batch(config.outer.meta_batch_size)
    seed_everything(config.run.seed, config.run.deterministic)
    train_split = build_split(config.data, "train")
    val_split = build_split(config.data, "val")
    image_size = config.data.image_size or train_split.native_size
    check_memory(config, train_split.channels, image_size, device)
    learner = build_meta_learner(config, train_split.channels, image_size).to(device)
    o, mask_params = config.outer, learner.mask_parameters()
    return Experiment(
        config=config, device=device, learner=learner,
        theta_optimizer=OPTIMIZERS[o.optimizer](learner.theta_parameters(), o.lr, o.momentum),
        mask_optimizer=(OPTIMIZERS[o.mask_optimizer](mask_params, o.mask_lr, o.momentum)
                        if mask_params else None),
        train_episodes=build_episodes(config.data, train_split, config.run.seed,
                                      config.data.augment, device=device),
        val_episodes=build_episodes(config.data, val_split, EVAL_SEED, augment=False, device=device),
        inputs=input_record(train_split, image_size))
