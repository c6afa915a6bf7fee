"""Evaluation on fixed tasks: validation during training, and testing a run's best checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, distributed
from .config import Config
from .data import (DataError, EpisodeDataset, FewShotSplit, apply_input_record, build_episodes,
                   build_split, episode_loader)
from .meta_learner import MetaLearner, build_meta_learner
from .runtime import resolve_device, seed_everything

# Validation and test tasks use this seed whatever run.seed is, so every method and every seed is
# scored on the same fixed task lists.
EVAL_SEED = 0


def evaluate(learner: MetaLearner, episodes: EpisodeDataset, num_tasks: int, tasks_per_batch: int,
             steps: int, device: torch.device, num_workers: int = 0,
             desc: Optional[str] = None) -> np.ndarray:
    """Query accuracy of each of the fixed tasks 0..num_tasks-1 after `steps` inner steps.

    Under torchrun each process adapts a contiguous block of the batches one process would form,
    and every process returns all accuracies in task order. A process draws (and drops) the
    generator noise of the other processes' batches, so every task gets the noise it gets in a
    single process and the random stream ends where it would.
    """
    num_batches = -(-num_tasks // tasks_per_batch)
    sizes = [min(tasks_per_batch, num_tasks - b * tasks_per_batch) for b in range(num_batches)]
    blocks = [distributed.block(num_batches, r) for r in range(distributed.world_size())]
    counts = [sum(sizes[b] for b in block) for block in blocks]
    rank = distributed.rank()
    mine = blocks[rank]  # batch numbers this process adapts
    # Started first, and even for an empty block, as in one process: starting a DataLoader draws
    # from torch's generator, which the noise comes from as well.
    batches = iter(episode_loader(episodes, mine.start * tasks_per_batch, counts[rank],
                                  tasks_per_batch, num_workers, pin_memory=device.type == "cuda"))
    for b in range(mine.start):
        learner.skip_masks(sizes[b])
    accuracies = []
    show = desc is not None and distributed.is_main_process()
    for batch in tqdm(batches, desc=desc, total=len(mine), leave=False, disable=not show,
                      dynamic_ncols=True):
        _, _, acc = learner(batch.to(device, non_blocking=True), steps, track_outer=False)
        accuracies.append(acc.cpu())
    for b in range(mine.stop, num_batches):
        learner.skip_masks(sizes[b])
    local = torch.cat(accuracies) if accuracies else torch.zeros(0)
    return distributed.gather_blocks(local, counts).numpy()


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """checkpoint.load; under torchrun rank 0 reads the file and sends it to the others (no shared
    folder needed)."""
    if distributed.is_distributed():
        return distributed.on_main(checkpoint.load, Path(path), map_location="cpu")
    return checkpoint.load(Path(path), map_location=device)


def restore_learner(config: Config, path: Path, state: dict, in_channels: int, image_size: int,
                    device: torch.device) -> MetaLearner:
    """The meta-learner built from `config` with the weights of `state`, read from `path`."""
    learner = build_meta_learner(config, in_channels, image_size).to(device)
    try:
        learner.load_state_dict(state["learner"])
    except RuntimeError as err:
        raise checkpoint.CheckpointError(
            f"{path} does not fit the model built from the config (did an override change "
            f"model.*, data.num_ways or the input channels?): {err}") from err
    return learner


def evaluate_split(learner: MetaLearner, config: Config, data_split: FewShotSplit,
                   device: torch.device, num_tasks: Optional[int] = None,
                   steps: Optional[int] = None) -> np.ndarray:
    """Accuracies on the fixed tasks of `data_split` (default: train.num_test_tasks tasks,
    inner.eval_steps steps, data.test_query query images per class), as test.py scores them."""
    # Reseeded here so sparse-MAML+'s per-task noise is the same whoever calls (test.py, the API).
    seed_everything(config.run.seed, config.run.deterministic)
    episodes = build_episodes(config.data, data_split, EVAL_SEED, augment=False, device=device,
                              num_query=config.data.test_query)
    num_tasks = config.train.num_test_tasks if num_tasks is None else num_tasks
    steps = config.inner.eval_steps if steps is None else steps
    desc = f"test {config.data.name}/{data_split.split}" if config.run.progress else None
    return evaluate(learner, episodes, num_tasks, config.train.eval_batch_size, steps, device,
                    config.data.num_workers, desc)


def evaluation_split(config: Config, split: str, inputs: Optional[dict] = None,
                     source: str = "") -> FewShotSplit:
    """One split of the run's dataset, read as the run read its inputs: `inputs` is the record its
    checkpoint `source` holds (data.input_record; None for older checkpoints: normalised as in
    training, from the train split). Never downloads: opening a received run writes nothing
    outside its folder, and a missing dataset's message names the command that prepares it."""
    data = dataclasses.replace(config.data, download=False)
    try:
        if inputs is None:
            return build_split(data, split)
        return apply_input_record(build_split(data, split, normalized=False), inputs, source)
    except DataError as err:
        if not config.data.download:
            raise
        raise DataError(f"{err}\n(evaluation does not download: data.download is ignored)") from err


def test_checkpoint(config: Config, run_dir: Path, split: str = "test",
                    device: Optional[torch.device] = None) -> tuple[np.ndarray, dict]:
    """Evaluate a run's best checkpoint on `config.train.num_test_tasks` fixed tasks of `split`
    (under torchrun, split across the processes)."""
    device = device or resolve_device(config.run.device)
    seed_everything(config.run.seed, config.run.deterministic)
    path = Path(run_dir) / checkpoint.BEST
    state = load_checkpoint(path, device)
    inputs = state.get("inputs")
    data_split = evaluation_split(config, split, inputs, str(path))
    size = inputs["image_size"] if inputs else config.data.image_size or data_split.native_size
    learner = restore_learner(config, path, state, data_split.channels, size, device)
    accs = evaluate_split(learner, config, data_split, device)
    return accs, {"epoch": state.get("epoch"), "val_accuracy": state.get("val_accuracy"),
                  "sparsity": learner.mask_sparsity()}
