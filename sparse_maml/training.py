"""Meta-training and evaluation: the engine behind train.py and test.py.

A run can stop and continue exactly. Every checkpoint holds theta, phi (and the generator), both
optimizers, the (future) LR schedulers, the TrainState (counters, best-validation record, the
current epoch's running losses) and every RNG state; the training episodes are a pure function of
(run.seed, task index), so the stream position is the step counter. On CPU with the same settings
an interrupted and resumed run writes the same metrics.jsonl (apart from the wall-clock `seconds`
field) and the same weights, bit for bit, as an uninterrupted one.

Under torchrun (see distributed.py) every process runs this same code: each adapts its share of
every meta-batch and of the evaluation tasks, the outer gradients and the logged numbers are summed
across processes, and only rank 0 writes checkpoints and best.pt.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint, compiled, distributed
from .config import Config, ConfigError, TrainConfig, load_config, to_dict
from .data import EpisodeDataset, build_episodes, build_split, episode_loader, stack_tasks
from .evaluation import EVAL_SEED, evaluate
from .meta_learner import MetaLearner, build_meta_learner
from .run_log import (CONFIG, WRITTEN, NullRunLog, RunLog, check_existing_run, check_resumable,
                      make_folder, make_run_dir, new_run_dir, record_written,
                      remove_stale_temporaries, write_config)
from .run_lock import RunLock
from .runtime import mean_confidence_interval, resolve_device, seed_everything

# Exit statuses of train.py besides 0 (done) and 1 (error); Python itself uses 1 and 2.
EXIT_STOPPED = 3  # stopped by SIGTERM/SIGINT after checkpointing: resumable
EXIT_DIVERGED = 4  # the NaN guard stopped the run (a checkpoint of the last good state was written)

Report = Callable[[str], None]


class TrainingStopped(Exception):
    """fit() stopped on request after checkpointing; the run can be resumed."""

    def __init__(self, message: str, checkpoint_path: Path):
        super().__init__(message)
        self.checkpoint_path = checkpoint_path


class TrainingDiverged(RuntimeError):
    """Too many consecutive meta-batches had a non-finite outer loss or gradient."""

    def __init__(self, message: str, checkpoint_path: Path):
        super().__init__(message)
        self.checkpoint_path = checkpoint_path


class StopSignal:
    """Context manager: the first SIGTERM/SIGINT asks the training loop to stop after the current
    meta-batch (call the object to ask whether one came); a second one ends the process at once.

    Installed by the entry point around fit(), never on import; outside the main thread it does
    nothing.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # second signal: die of it, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def make_optimizer(kind: str, params: list[torch.nn.Parameter], lr: float,
                   momentum: float) -> torch.optim.Optimizer:
    """Adam, or SGD with Nesterov momentum (as the reference)."""
    if kind == "adam":
        return torch.optim.Adam(params, lr)
    return torch.optim.SGD(params, lr, momentum=momentum, nesterov=momentum > 0)


@dataclass
class TrainState:
    """Counters, the best-validation record and the running epoch; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # meta-batches completed (skipped ones included): the episode stream position
    best_val_accuracy: float = -1.0
    best_val_ci: float = float("nan")
    best_epoch: int = 0
    skipped_steps: int = 0  # updates skipped by the NaN guard, over the whole run
    bad_streak: int = 0  # consecutive skipped updates up to now
    # The epoch in progress, so a mid-epoch checkpoint reproduces its train record exactly.
    epoch_losses: list[float] = field(default_factory=list)
    epoch_accuracies: list[float] = field(default_factory=list)
    epoch_skipped: int = 0
    epoch_seconds: float = 0.0  # wall-clock seconds spent in the epoch before the last checkpoint
    # Meta-batches done when the outer optimizers' state was last cleared
    # (outer.reset_optimizer_every): one reset per reset point, whichever side of it a checkpoint
    # was written.
    optimizer_reset_step: int = 0


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
    # RNG states from a checkpoint, applied by fit() once its episode loader exists (creating a
    # DataLoader iterator draws from torch's generator, which the uninterrupted run did earlier).
    pending_rng: Optional[dict] = None
    # The weights and optimizer states of the last meta-batch whose outer loss was finite: what the
    # NaN guard rolls back to (see fit). None until one such meta-batch in this process.
    last_good: Optional[dict] = None


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

    The estimate is a lower bound: the float32 images of the larger of a meta-batch and an
    evaluation batch, and the first block's two activation maps (convolution and batch norm),
    each kept once; a real step needs several times more, so only a hopeless size is refused.
    """
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
    outer = config.outer
    theta_opt = make_optimizer(outer.optimizer, learner.theta_parameters(), outer.lr, outer.momentum)
    mask_params = learner.mask_parameters()
    mask_opt = (make_optimizer(outer.mask_optimizer, mask_params, outer.mask_lr, outer.momentum)
                if mask_params else None)
    return Experiment(
        config=config, device=device, learner=learner, theta_optimizer=theta_opt,
        mask_optimizer=mask_opt,
        train_episodes=build_episodes(config.data, train_split, config.run.seed, config.data.augment,
                                      device=device),
        val_episodes=build_episodes(config.data, val_split, EVAL_SEED, augment=False, device=device),
    )


def reset_optimizers_if_due(exp: Experiment) -> bool:
    """Clear the outer optimizers' state (as if they were built anew) before meta-batch
    state.step when outer.reset_optimizer_every divides it; True if they were cleared."""
    every, state = exp.config.outer.reset_optimizer_every, exp.state
    if not every or state.step == 0 or state.step % every or state.optimizer_reset_step == state.step:
        return False
    for opt in _optimizers(exp):
        opt.state.clear()  # Adam and SGD create each parameter's state afresh when it is empty
    state.optimizer_reset_step = state.step
    return True


def outer_step(exp: Experiment, batch) -> tuple[float, float, bool]:
    """One meta-update on a batch of tasks; returns (outer loss, mean query accuracy, applied).

    If the loss or any gradient is not finite, no parameter or optimizer state changes and
    `applied` is False. Under torchrun `batch` is this process's share of the meta-batch; the
    loss, accuracy, gradients and the skip decision are those of the whole meta-batch, the same
    on every process.
    """
    if distributed.is_distributed():
        return _outer_step_shared(exp, batch)
    learner, config = exp.learner, exp.config
    optimizers = [o for o in (exp.theta_optimizer, exp.mask_optimizer) if o is not None]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss, _, accuracies = learner(batch, config.inner.steps)
    finite = bool(torch.isfinite(loss))
    if finite:
        loss.backward()
        grads = [p.grad for p in learner.parameters() if p.grad is not None]
        finite = not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
    if not finite:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return loss.item(), accuracies.mean().item(), False
    return loss.item(), accuracies.mean().item(), _apply_update(exp, optimizers)


def _outer_step_shared(exp: Experiment, batch) -> tuple[float, float, bool]:
    """outer_step for one process's share of a meta-batch split across processes."""
    learner, config = exp.learner, exp.config
    optimizers = [o for o in (exp.theta_optimizer, exp.mask_optimizer) if o is not None]
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total = config.outer.meta_batch_size
    first, share = distributed.train_share(total)
    loss, _, accuracies = learner(batch, config.inner.steps, share=(first, total))
    if learner.loss_reduction == "mean":  # the mean over all `total` tasks, once summed
        loss = loss * (share / total)
    # (summed loss, summed accuracy, processes with a non-finite loss) in one collective
    stats = distributed.all_reduce_sum(torch.stack(
        [loss.detach(), accuracies.sum(), (~torch.isfinite(loss.detach())).float()]))
    global_loss, global_acc = stats[0].item(), stats[1].item() / total
    finite = stats[2].item() == 0  # one process alone would have a non-finite sum as well
    if finite:
        loss.backward()
        params = [p for p in learner.parameters() if p.grad is not None]
        distributed.all_reduce_gradients(params)
        grads = [p.grad for p in params]
        local = not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
        finite = not distributed.any_process(not local)
    if not finite:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return global_loss, global_acc, False
    return global_loss, global_acc, _apply_update(exp, optimizers)


def snapshot(exp: Experiment) -> dict:
    """Copies of the learner's state and of the optimizer states, for rolling an update back."""
    return {"learner": {k: v.detach().clone() for k, v in exp.learner.state_dict().items()},
            "optimizers": [copy.deepcopy(o.state_dict()) for o in _optimizers(exp)]}


def roll_back(exp: Experiment, saved: dict) -> None:
    """Put back the weights and optimizer states of a snapshot()."""
    exp.learner.load_state_dict(saved["learner"])
    for opt, state in zip(_optimizers(exp), saved["optimizers"]):
        opt.load_state_dict(copy.deepcopy(state))


def state_is_finite(exp: Experiment) -> bool:
    """Whether every weight, buffer and optimizer-state tensor is finite (all processes agree)."""
    tensors = list(exp.learner.state_dict().values())
    for opt in _optimizers(exp):
        for per_param in opt.state.values():
            tensors += [v for v in per_param.values() if torch.is_tensor(v)]
    checks = [t.isfinite().all() for t in tensors if t.is_floating_point()]
    finite = not checks or bool(torch.stack(checks).all())  # one device sync, not one per tensor
    return not distributed.any_process(not finite)


def _optimizers(exp: Experiment) -> list[torch.optim.Optimizer]:
    return [o for o in (exp.theta_optimizer, exp.mask_optimizer) if o is not None]


def guarded_step(exp: Experiment, batch) -> tuple[float, float, bool]:
    """outer_step, then undo an update that left a weight or an optimizer state non-finite.

    A finite loss marks the weights it was computed with as good (exp.last_good). An update can
    still overflow (outer.lr=1e300 gives inf weights) or give finite but huge weights (1e30) whose
    next loss is not finite; the first is rolled back here at once, the second by fit() when the
    NaN guard stops the run, so the stop checkpoint never holds weights that gave no finite loss.
    """
    before = snapshot(exp)
    loss, acc, applied = outer_step(exp, batch)
    if not applied:
        roll_back(exp, before)  # an overflowing optimizer step may have changed some tensors
        return loss, acc, False
    if not state_is_finite(exp):
        roll_back(exp, before)
        return loss, acc, False
    exp.last_good = before  # these weights gave a finite loss and a finite update
    return loss, acc, True


def _apply_update(exp: Experiment, optimizers: list[torch.optim.Optimizer]) -> bool:
    """Clamp theta's gradients if configured, then step the optimizers; False if a step overflowed
    (torch refuses a learning rate beyond float32's range, e.g. outer.lr=1e300, part way through
    the update: the caller rolls it back)."""
    learner, config = exp.learner, exp.config
    if config.outer.grad_clamp is not None:  # theta only, as in the reference
        c = config.outer.grad_clamp
        for p in learner.theta_parameters():
            if p.grad is not None:
                p.grad.clamp_(-c, c)
    try:
        for opt in optimizers:
            opt.step()
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return False
    return True


def train_batches(exp: Experiment, first_step: int, num_steps: int) -> Iterable:
    """This process's share of meta-batches first_step .. first_step+num_steps-1.

    Meta-batch s holds training episodes s*T .. s*T+T-1 (T = outer.meta_batch_size); under torchrun
    rank r takes the r-th contiguous share of T / world_size of them, so which episodes a task gets
    depends only on (run.seed, step, task), never on the number of processes.
    """
    config, tasks = exp.config, exp.config.outer.meta_batch_size
    pin = exp.device.type == "cuda"
    if not distributed.is_distributed():
        return episode_loader(exp.train_episodes, first_step * tasks, num_steps * tasks, tasks,
                              config.data.num_workers, pin_memory=pin)
    first, share = distributed.train_share(tasks)
    indices = [s * tasks + first + j for s in range(first_step, first_step + num_steps)
               for j in range(share)]
    dataset = exp.train_episodes
    if dataset.on_device:
        return (dataset.batch(indices[i:i + share]) for i in range(0, len(indices), share))
    return DataLoader(dataset, sampler=indices, batch_size=share, collate_fn=stack_tasks,
                      num_workers=config.data.num_workers, pin_memory=pin)


def rng_states() -> dict:
    """Python, NumPy and torch (CPU, CUDA) random states, as tensors and plain values (so that a
    checkpoint loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    """Restore what rng_states() returned (CUDA states only where the same devices exist)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch"].cpu())
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def save_checkpoint(exp: Experiment, run_dir: Path, log: RunLog) -> Path:
    """Checkpoint everything needed to continue this run as checkpoint-<step>.pt; keep the last k.

    Returns the path on every process; only rank 0 writes.
    """
    path = Path(run_dir) / checkpoint.checkpoint_name(exp.state.step)
    if not distributed.is_main_process():  # every process holds the same state; rank 0 writes it
        return path
    log.flush()
    record_written(Path(run_dir), path.name)
    checkpoint.save_atomic({
        "format": checkpoint.FORMAT,
        "learner": exp.learner.state_dict(),
        "theta_optimizer": exp.theta_optimizer.state_dict(),
        "mask_optimizer": exp.mask_optimizer.state_dict() if exp.mask_optimizer else None,
        "schedulers": {},  # name -> state_dict, for LR schedulers once there are any
        "state": dataclasses.asdict(exp.state),
        "rng": rng_states(),
        "metrics_bytes": log.size(),
        "config": to_dict(exp.config),
    }, path)
    checkpoint.prune(run_dir, exp.config.run.keep_checkpoints)
    return path


def restore_checkpoint(exp: Experiment, saved: dict, path: Path) -> None:
    """Load a checkpoint written by save_checkpoint into a freshly built experiment."""
    missing = [k for k in ("learner", "theta_optimizer", "mask_optimizer", "state", "rng",
                           "metrics_bytes") if k not in saved]
    if missing or saved.get("format") != checkpoint.FORMAT:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} is not a training checkpoint of this version "
            f"(format {saved.get('format')!r}, missing {', '.join(missing) or 'nothing'})")
    try:
        exp.learner.load_state_dict(saved["learner"])
        exp.theta_optimizer.load_state_dict(saved["theta_optimizer"])
        if (saved["mask_optimizer"] is None) != (exp.mask_optimizer is None):
            raise ValueError("the checkpoint and the config disagree on whether phi is learned")
        if exp.mask_optimizer is not None:
            exp.mask_optimizer.load_state_dict(saved["mask_optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} does not fit the model built from the config: {err}") from err
    known = {f.name for f in dataclasses.fields(TrainState)}
    exp.state = TrainState(**{k: v for k, v in saved["state"].items() if k in known})
    train = exp.config.train
    done_in_epoch = exp.state.step - exp.state.epoch * train.batches_per_epoch
    if not 0 <= done_in_epoch <= train.batches_per_epoch:
        raise checkpoint.CheckpointError(
            f"checkpoint {path}: step {exp.state.step} after {exp.state.epoch} epochs does not fit "
            f"train.batches_per_epoch={train.batches_per_epoch}")
    if exp.state.epoch > train.epochs:
        raise ConfigError(f"train.epochs={train.epochs}, but {path} has already completed "
                          f"{exp.state.epoch} epochs")
    exp.pending_rng = saved["rng"]


def validates(train_cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch `epoch` (1-based) is validated: every val_every epochs from val_from_epoch on
    (earlier ones only with validate_early), and the last epoch if it is not before val_from_epoch."""
    if epoch < train_cfg.val_from_epoch and not train_cfg.validate_early:
        return False
    return epoch % train_cfg.val_every == 0 or epoch == train_cfg.epochs


def _validate_epoch(exp: Experiment, run_dir: Path, log: RunLog, record: dict, bar: tqdm) -> None:
    """Score the fixed validation tasks; keep best.pt; log and print the epoch."""
    config, learner, state, train_cfg = exp.config, exp.learner, exp.state, exp.config.train
    epoch = state.epoch
    accs = evaluate(learner, exp.val_episodes, train_cfg.num_val_tasks, train_cfg.eval_batch_size,
                    config.inner.eval_steps, exp.device, config.data.num_workers,
                    desc="validate" if config.run.progress else None)
    mean, ci = mean_confidence_interval(accs)
    is_best = epoch >= train_cfg.val_from_epoch and mean > state.best_val_accuracy
    if is_best:
        state.best_val_accuracy, state.best_val_ci, state.best_epoch = mean, ci, epoch
    if is_best and distributed.is_main_process():
        record_written(run_dir, checkpoint.BEST)
        checkpoint.save_atomic({"learner": learner.state_dict(), "epoch": epoch, "step": state.step,
                                "val_accuracy": mean, "val_ci": ci}, run_dir / checkpoint.BEST)
    log.log("val", state.step, epoch=epoch, accuracy=mean, ci95=ci, best=is_best,
            best_epoch=state.best_epoch)
    sparsity_text = (f", mask sparsity {record['mask_sparsity']:.1%}"
                     if "mask_sparsity" in record else "")
    bar.write(f"epoch {epoch}: train loss {record['loss']:.3f}, "
              f"val accuracy {mean:.2%} +- {ci:.2%}{sparsity_text}" + (" (best)" if is_best else ""))


def open_run(config: Config, device: torch.device, resume_dir: Optional[Path] = None,
             report: Report = print) -> tuple[Experiment, Path, RunLog | NullRunLog]:
    """The experiment, its run folder and its log: a new run, or the run in `resume_dir` restored
    from its newest loadable checkpoint. Only rank 0 writes, holding the folder's lock (released by
    the log's close()); every process builds the same state."""
    main_process = distributed.is_main_process()
    if resume_dir is None:
        run_dir = distributed.on_main(new_run_dir, config)  # rank 0 picks the time-stamped name
        try:
            exp = build_experiment(config, device)  # data errors surface before the folder is written
        except BaseException:
            if main_process and not config.run.dir:
                _remove_if_empty(run_dir)
            raise
        lock = None
        if main_process:
            make_folder(run_dir, exist_ok=True)
            lock = RunLock(run_dir, report).acquire()
        try:
            distributed.on_main(make_run_dir, config, run_dir)  # refuses a used folder, under the lock
            return exp, run_dir, (RunLog(run_dir, config.run.tensorboard, lock=lock)
                                  if main_process else NullRunLog())
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    check_existing_run(config, resume_dir)  # a clear message for a folder that holds no run
    lock = RunLock(resume_dir, report).acquire() if main_process else None
    try:
        return _open_existing(config, device, resume_dir, lock, report)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _remove_if_empty(folder: Path) -> None:
    """Remove a run folder made for a run that failed before writing anything."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _open_existing(config: Config, device: torch.device, resume_dir: Path, lock: Optional[RunLock],
                   report: Report) -> tuple[Experiment, Path, RunLog | NullRunLog]:
    """open_run for a run folder that already holds the run, its lock taken."""
    main_process = distributed.is_main_process()
    changes = check_existing_run(config, resume_dir)  # again, under the lock; nothing touched yet
    if main_process:  # only temporaries of files the run recorded (a record-less older run: *.pt)
        if (resume_dir / WRITTEN).is_file():
            remove_stale_temporaries(resume_dir)
        else:
            checkpoint.remove_stale_temporaries(resume_dir)
    found = checkpoint.load_latest(resume_dir)  # every process reads the same checkpoint
    if found is not None:
        path, saved = found
        _check_against_checkpoint(config, saved, path)
    exp = build_experiment(config, device)
    if found is not None:
        restore_checkpoint(exp, saved, path)
    distributed.barrier()  # all have read the checkpoints before rank 0 writes anything
    if main_process:  # only once the checkpoint fits the new config
        write_config(config, resume_dir / CONFIG)
    for key, (old, new) in changes.items():
        if key != "run.dir":
            report(f"resume: {key}: {old!r} -> {new!r}")
    if not main_process:
        return exp, resume_dir, NullRunLog()
    if found is None:
        report(f"{resume_dir} holds no checkpoint yet: starting it from the beginning")
        log = RunLog(resume_dir, config.run.tensorboard, truncate_to=0, purge_step=0, lock=lock)
    else:
        report(f"resuming {resume_dir} from {path.name}: {exp.state.epoch} epochs and "
               f"{exp.state.step} meta-batches done")
        log = RunLog(resume_dir, config.run.tensorboard, truncate_to=saved["metrics_bytes"],
                     purge_step=exp.state.step + 1, lock=lock)
    if log.dropped:
        kinds = sorted({str(r.get("kind")) for r in log.dropped})
        report(f"resume: dropped {len(log.dropped)} records of metrics.jsonl written after the "
               f"checkpoint ({', '.join(kinds)}); the resumed run writes them again")
    if log.kept:
        report(f"resume: kept {len(log.kept)} test.py records written after the checkpoint")
    return exp, resume_dir, log


def _check_against_checkpoint(config: Config, saved: dict, path: Path) -> None:
    """Refuse a config that differs from the one the checkpoint was trained with (config.yaml
    may have been edited by hand since) in keys a resume may not change."""
    if not isinstance(saved.get("config"), dict):
        return  # checkpoints of older versions do not hold their config
    try:
        used = load_config(None, (), base=saved["config"])
    except ConfigError as err:
        raise checkpoint.CheckpointError(f"checkpoint {path} holds a config this version cannot "
                                         f"read: {err}") from err
    try:
        check_resumable(used, config, path.parent)
    except ConfigError as err:
        raise ConfigError(f"{err}\n(compared with the config stored in {path}, which is what the run "
                          f"used: was {CONFIG} edited by hand?)") from err


def report_compilation(learner: MetaLearner, bar: tqdm) -> None:
    """Say which graphs outer.implementation=compiled just compiled, and how long it took."""
    events = learner.compile_events()
    if events and distributed.is_main_process():
        took = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in events)
        bar.write(f"compiled {took} (kernel cache: {compiled.cache_dir()})")


def fit(exp: Experiment, run_dir: Path, log: RunLog, report: Report = print,
        should_stop: Callable[[], bool] = lambda: False) -> TrainState:
    """Meta-train for config.train.epochs from exp.state, validating and checkpointing.

    Checkpoints after every epoch, every run.checkpoint_every meta-batches, and before raising
    TrainingStopped (should_stop() returned True after a meta-batch) or TrainingDiverged
    (outer.max_bad_steps consecutive non-finite updates, each skipped).
    """
    config, learner, state = exp.config, exp.learner, exp.state
    train_cfg = config.train
    bpe, every = train_cfg.batches_per_epoch, config.run.checkpoint_every
    show = config.run.progress and distributed.is_main_process()
    bar = tqdm(total=train_cfg.epochs * bpe, initial=state.step, desc="meta-train",
               dynamic_ncols=True, disable=not show)
    clock = time.time()

    def save(mid_epoch: bool = True) -> Path:
        nonlocal clock
        if mid_epoch:  # carry the epoch's training time so far into the checkpoint
            now = time.time()
            state.epoch_seconds += now - clock
            clock = now
        return save_checkpoint(exp, run_dir, log)

    def stop_requested() -> bool:  # agreed by all processes, so all stop after the same step
        return distributed.any_process(should_stop())

    while state.epoch < train_cfg.epochs:
        epoch = state.epoch + 1
        done = state.step - state.epoch * bpe  # meta-batches of this epoch already done (resume)
        if exp.pending_rng is not None and done == 0:
            # Resumed at an epoch end: the uninterrupted run starts this epoch's loader next.
            set_rng_states(exp.pending_rng)
            exp.pending_rng = None
        batches = iter(train_batches(exp, state.step, bpe - done))
        if exp.pending_rng is not None:  # mid-epoch: that loader was started before the checkpoint
            set_rng_states(exp.pending_rng)
            exp.pending_rng = None
        for batch in batches:
            reset_optimizers_if_due(exp)
            loss, acc, applied = guarded_step(exp, batch.to(exp.device, non_blocking=True))
            report_compilation(learner, bar)
            state.step += 1
            bar.update(1)
            if applied:
                state.bad_streak = 0
                state.epoch_losses.append(loss)
                state.epoch_accuracies.append(acc)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", acc=f"{acc:.3f}")
                log.scalars("train_step", state.step, loss=loss, accuracy=acc)
            else:
                state.bad_streak += 1
                state.skipped_steps += 1
                state.epoch_skipped += 1
                bar.write(f"step {state.step}: non-finite outer loss ({loss}), gradient, weight "
                          f"or optimizer state; update skipped ({state.bad_streak} in a row)")
                if state.bad_streak >= config.outer.max_bad_steps:
                    log.log("diverged", state.step, epoch=epoch, bad_streak=state.bad_streak,
                            skipped_steps=state.skipped_steps)
                    if exp.last_good is not None:  # the weights that last gave a finite loss
                        roll_back(exp, exp.last_good)
                    path = save()
                    bar.close()
                    raise TrainingDiverged(
                        f"stopped: {state.bad_streak} consecutive meta-batches (up to step "
                        f"{state.step}) had a non-finite outer loss, gradient or update "
                        f"(outer.max_bad_steps={config.outer.max_bad_steps}); the weights in {path} "
                        "are the last good ones. Lower outer.lr, outer.mask_lr or inner.step_size, "
                        "or set outer.grad_clamp.", path)
            if stop_requested():
                path = save()
                bar.close()
                raise TrainingStopped(f"stopped at step {state.step} (epoch {epoch}); checkpoint "
                                      f"{path}", path)
            if every and state.step % every == 0 and state.step % bpe != 0:
                save()
        sparsity = learner.mask_sparsity()
        losses, accuracies = state.epoch_losses, state.epoch_accuracies
        record = {"epoch": epoch,
                  "loss": float(np.mean(losses)) if losses else float("nan"),
                  "accuracy": float(np.mean(accuracies)) if accuracies else float("nan"),
                  "skipped_steps": state.epoch_skipped,
                  "seconds": state.epoch_seconds + time.time() - clock}
        if sparsity:
            record["mask_sparsity"] = float(sparsity.pop("mean"))
            record["layer_sparsity"] = sparsity
        log.log("train", state.step, **record)
        state.epoch = epoch
        state.epoch_losses, state.epoch_accuracies = [], []
        state.epoch_skipped, state.epoch_seconds = 0, 0.0
        if validates(train_cfg, epoch):
            _validate_epoch(exp, run_dir, log, record, bar)
            report_compilation(learner, bar)
        path = save(mid_epoch=False)
        clock = time.time()  # the next epoch's time starts here, validation excluded
        if stop_requested():
            bar.close()
            raise TrainingStopped(f"stopped after epoch {epoch} (step {state.step}); checkpoint "
                                  f"{path}", path)
    bar.close()
    if exp.pending_rng is not None:  # resumed a run whose training was already complete
        set_rng_states(exp.pending_rng)
        exp.pending_rng = None
    if state.best_epoch == 0 and distributed.is_main_process():
        # val_from_epoch beyond the last epoch: keep the final weights
        record_written(run_dir, checkpoint.BEST)
        checkpoint.save_atomic({"learner": learner.state_dict(), "epoch": state.epoch,
                                "step": state.step, "val_accuracy": float("nan"),
                                "val_ci": float("nan")}, run_dir / checkpoint.BEST)
        report(f"no validation after train.val_from_epoch={train_cfg.val_from_epoch}: "
               "best.pt holds the final weights")
    return state
