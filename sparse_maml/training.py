"""Meta-training and evaluation: the engine behind train.py and test.py."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint
from .config import Config
from .data import EpisodeDataset, build_episodes, build_split, episode_loader
from .meta_learner import MetaLearner, build_meta_learner
from .run_log import RunLog
from .runtime import mean_confidence_interval, resolve_device, seed_everything

# Validation and test tasks use this seed whatever run.seed is, so every method and every seed is
# scored on the same fixed task lists.
EVAL_SEED = 0

Report = Callable[[str], None]


def make_optimizer(kind: str, params: list[torch.nn.Parameter], lr: float,
                   momentum: float) -> torch.optim.Optimizer:
    """Adam, or SGD with Nesterov momentum (as the reference)."""
    if kind == "adam":
        return torch.optim.Adam(params, lr)
    return torch.optim.SGD(params, lr, momentum=momentum, nesterov=momentum > 0)


@dataclass
class TrainState:
    """Counters and the best-validation record; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # meta-batches completed
    best_val_accuracy: float = -1.0
    best_val_ci: float = float("nan")
    best_epoch: int = 0


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
    state: TrainState = field(default_factory=TrainState)


def build_experiment(config: Config, device: Optional[torch.device] = None) -> Experiment:
    """Data, meta-learner and optimizers; seeds everything first."""
    device = device or resolve_device(config.run.device)
    seed_everything(config.run.seed, config.run.deterministic)
    train_split = build_split(config.data, "train")
    val_split = build_split(config.data, "val")
    image_size = config.data.image_size or train_split.native_size
    learner = build_meta_learner(config, train_split.channels, image_size).to(device)
    outer = config.outer
    theta_opt = make_optimizer(outer.optimizer, learner.theta_parameters(), outer.lr, outer.momentum)
    mask_params = learner.mask_parameters()
    mask_opt = (make_optimizer(outer.mask_optimizer, mask_params, outer.mask_lr, outer.momentum)
                if mask_params else None)
    return Experiment(
        config=config, device=device, learner=learner, theta_optimizer=theta_opt,
        mask_optimizer=mask_opt,
        train_episodes=build_episodes(config.data, train_split, config.run.seed, config.data.augment),
        val_episodes=build_episodes(config.data, val_split, EVAL_SEED, augment=False),
    )


def outer_step(exp: Experiment, batch) -> tuple[float, float]:
    """One meta-update on a batch of tasks; returns (outer loss, mean query accuracy)."""
    learner, config = exp.learner, exp.config
    optimizers = [o for o in (exp.theta_optimizer, exp.mask_optimizer) if o is not None]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss, _, accuracies = learner(batch, config.inner.steps)
    loss.backward()
    if config.outer.grad_clamp is not None:  # theta only, as in the reference
        c = config.outer.grad_clamp
        for p in learner.theta_parameters():
            if p.grad is not None:
                p.grad.clamp_(-c, c)
    for opt in optimizers:
        opt.step()
    return loss.item(), accuracies.mean().item()


def evaluate(learner: MetaLearner, episodes: EpisodeDataset, num_tasks: int, tasks_per_batch: int,
             steps: int, device: torch.device, num_workers: int = 0,
             desc: Optional[str] = None) -> np.ndarray:
    """Query accuracy of each of the fixed tasks 0..num_tasks-1 after `steps` inner steps."""
    loader = episode_loader(episodes, 0, num_tasks, tasks_per_batch, num_workers,
                            pin_memory=device.type == "cuda")
    accuracies = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=desc is None, dynamic_ncols=True):
        _, _, acc = learner(batch.to(device, non_blocking=True), steps, track_outer=False)
        accuracies.append(acc.cpu())
    return torch.cat(accuracies).numpy()


def rng_states() -> dict:
    """Python, NumPy and torch (CPU, CUDA) random states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_last(exp: Experiment, run_dir: Path) -> None:
    """Checkpoint everything needed to continue this run."""
    checkpoint.save_atomic({
        "learner": exp.learner.state_dict(),
        "theta_optimizer": exp.theta_optimizer.state_dict(),
        "mask_optimizer": exp.mask_optimizer.state_dict() if exp.mask_optimizer else None,
        "state": dataclasses.asdict(exp.state),
        "rng": rng_states(),
    }, run_dir / checkpoint.LAST)


def fit(exp: Experiment, run_dir: Path, log: RunLog, report: Report = print) -> TrainState:
    """Meta-train for config.train.epochs, validating and keeping the best checkpoint."""
    config, learner, state = exp.config, exp.learner, exp.state
    train_cfg, tasks = config.train, config.outer.meta_batch_size
    total = train_cfg.epochs * train_cfg.batches_per_epoch
    bar = tqdm(total=total, initial=state.step, desc="meta-train", dynamic_ncols=True,
               disable=not config.run.progress)
    pin = exp.device.type == "cuda"
    while state.epoch < train_cfg.epochs:
        epoch = state.epoch + 1
        started = time.time()
        loader = episode_loader(exp.train_episodes, state.step * tasks,
                                train_cfg.batches_per_epoch * tasks, tasks, config.data.num_workers,
                                pin_memory=pin)
        losses, accuracies = [], []
        for batch in loader:
            loss, acc = outer_step(exp, batch.to(exp.device, non_blocking=True))
            losses.append(loss)
            accuracies.append(acc)
            state.step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", acc=f"{acc:.3f}")
        sparsity = learner.mask_sparsity()
        record = {"epoch": epoch, "loss": float(np.mean(losses)),
                  "accuracy": float(np.mean(accuracies)), "seconds": time.time() - started}
        if sparsity:
            record["mask_sparsity"] = float(sparsity.pop("mean"))
            record["layer_sparsity"] = sparsity
        log.log("train", state.step, **record)
        state.epoch = epoch
        if epoch % train_cfg.val_every == 0 or epoch == train_cfg.epochs:
            accs = evaluate(learner, exp.val_episodes, train_cfg.num_val_tasks,
                            train_cfg.eval_batch_size, config.inner.eval_steps, exp.device,
                            config.data.num_workers, desc="validate" if config.run.progress else None)
            mean, ci = mean_confidence_interval(accs)
            is_best = epoch >= train_cfg.val_from_epoch and mean > state.best_val_accuracy
            if is_best:
                state.best_val_accuracy, state.best_val_ci, state.best_epoch = mean, ci, epoch
                checkpoint.save_atomic({"learner": learner.state_dict(), "epoch": epoch,
                                        "val_accuracy": mean, "val_ci": ci},
                                       run_dir / checkpoint.BEST)
            log.log("val", state.step, epoch=epoch, accuracy=mean, ci95=ci, best=is_best,
                    best_epoch=state.best_epoch)
            sparsity_text = (f", mask sparsity {record['mask_sparsity']:.1%}"
                             if "mask_sparsity" in record else "")
            bar.write(f"epoch {epoch}: train loss {record['loss']:.3f}, "
                      f"val accuracy {mean:.2%} +- {ci:.2%}{sparsity_text}"
                      + (" (best)" if is_best else ""))
        save_last(exp, run_dir)
    bar.close()
    if state.best_epoch == 0:  # val_from_epoch beyond the last epoch: keep the final weights
        checkpoint.save_atomic({"learner": learner.state_dict(), "epoch": state.epoch,
                                "val_accuracy": float("nan"), "val_ci": float("nan")},
                               run_dir / checkpoint.BEST)
        report(f"no validation after train.val_from_epoch={train_cfg.val_from_epoch}: "
               "best.pt holds the final weights")
    return state


def test_checkpoint(config: Config, run_dir: Path, split: str = "test",
                    device: Optional[torch.device] = None) -> tuple[np.ndarray, dict]:
    """Evaluate a run's best checkpoint on `config.train.num_test_tasks` fixed tasks of `split`."""
    device = device or resolve_device(config.run.device)
    seed_everything(config.run.seed, config.run.deterministic)
    data_split = build_split(config.data, split)
    image_size = config.data.image_size or data_split.native_size
    learner = build_meta_learner(config, data_split.channels, image_size).to(device)
    state = checkpoint.load(Path(run_dir) / checkpoint.BEST, map_location=device)
    try:
        learner.load_state_dict(state["learner"])
    except RuntimeError as err:
        raise checkpoint.CheckpointError(
            f"{Path(run_dir) / checkpoint.BEST} does not fit the model built from the config "
            f"(did an override change model.*, data.num_ways or the input channels?): {err}") from err
    episodes = build_episodes(config.data, data_split, EVAL_SEED, augment=False)
    accs = evaluate(learner, episodes, config.train.num_test_tasks, config.train.eval_batch_size,
                    config.inner.eval_steps, device, config.data.num_workers,
                    desc=f"test {config.data.name}/{split}" if config.run.progress else None)
    return accs, {"epoch": state.get("epoch"), "val_accuracy": state.get("val_accuracy"),
                  "sparsity": learner.mask_sparsity()}
