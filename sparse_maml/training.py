"""Meta-training: the outer step, the epoch loop and validation (the engine behind train.py).

Under torchrun (see distributed.py) every process runs this same code on its share of every
meta-batch and of the evaluation tasks; gradients and logged numbers are summed across processes
and only rank 0 writes. For one process every distributed helper is the identity.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import compiled, distributed
from .checkpoint import TrainState, save_best, save_checkpoint
from .config import TrainConfig
from .data import episode_loader, stack_tasks
from .evaluation import evaluate
from .experiment import Experiment
from .meta_learner import MetaLearner
from .run_log import RunLog
from .runtime import mean_confidence_interval


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


def reset_optimizers_if_due(exp: Experiment) -> None:
    """Clear the outer optimizers' state (as if built anew) before meta-batch state.step when
    outer.reset_optimizer_every divides it, once per reset point."""
    every, state = exp.config.outer.reset_optimizer_every, exp.state
    if every and state.step and not state.step % every and state.optimizer_reset_step != state.step:
        for opt in exp.optimizers:
            opt.state.clear()  # Adam and SGD create each parameter's state afresh when it is empty
        state.optimizer_reset_step = state.step


def outer_step(exp: Experiment, batch) -> tuple[float, float, bool]:
    """One meta-update on a batch of tasks; returns (outer loss, mean query accuracy, applied).

    If the loss or a gradient is not finite, nothing is updated and `applied` is False; so too if
    an optimizer step overflows (torch refuses a learning rate beyond float32's range part way
    through the update: the caller rolls it back). Under torchrun `batch` is this process's share;
    the numbers and the skip decision are the whole meta-batch's."""
    learner, config = exp.learner, exp.config
    for opt in exp.optimizers:
        opt.zero_grad(set_to_none=True)
    total = config.outer.meta_batch_size
    first, share = distributed.train_share(total)
    loss, _, accuracies = learner(batch, config.inner.steps, share=(first, total))
    if learner.loss_reduction == "mean" and share != total:  # the mean over all tasks, once summed
        loss = loss * (share / total)
    # (summed loss, summed accuracy, processes with a non-finite loss) in one collective
    stats = distributed.all_reduce_sum(torch.stack(
        [loss.detach(), accuracies.sum(), (~torch.isfinite(loss.detach())).float()]))
    global_loss, global_acc = stats[0].item(), stats[1].item() / total
    applied = stats[2].item() == 0  # one process alone would have a non-finite sum as well
    if applied:
        loss.backward()
        params = [p for p in learner.parameters() if p.grad is not None]
        distributed.all_reduce_gradients(params)
        local = not params or bool(torch.stack([p.grad.isfinite().all() for p in params]).all())
        applied = not distributed.any_process(not local)
    if applied:
        if config.outer.grad_clamp is not None:  # theta only, as in the reference
            for p in learner.theta_parameters():
                if p.grad is not None:
                    p.grad.clamp_(-config.outer.grad_clamp, config.outer.grad_clamp)
        try:
            for opt in exp.optimizers:
                opt.step()
        except RuntimeError as err:
            if "overflow" not in str(err):
                raise
            applied = False
    if not applied:
        for opt in exp.optimizers:
            opt.zero_grad(set_to_none=True)
    return global_loss, global_acc, applied


def snapshot(exp: Experiment) -> dict:
    """Copies of the learner's state and of the optimizer states, for rolling an update back."""
    return {"learner": {k: v.detach().clone() for k, v in exp.learner.state_dict().items()},
            "optimizers": [copy.deepcopy(o.state_dict()) for o in exp.optimizers]}


def roll_back(exp: Experiment, saved: dict) -> None:
    """Put back the weights and optimizer states of a snapshot()."""
    exp.learner.load_state_dict(saved["learner"])
    for opt, state in zip(exp.optimizers, saved["optimizers"]):
        opt.load_state_dict(copy.deepcopy(state))


def state_is_finite(exp: Experiment) -> bool:
    """Whether every weight, buffer and optimizer-state tensor is finite (all processes agree)."""
    tensors = list(exp.learner.state_dict().values())
    for opt in exp.optimizers:
        for per_param in opt.state.values():
            tensors += [v for v in per_param.values() if torch.is_tensor(v)]
    checks = [t.isfinite().all() for t in tensors if t.is_floating_point()]
    finite = not checks or bool(torch.stack(checks).all())  # one device sync, not one per tensor
    return not distributed.any_process(not finite)


def guarded_step(exp: Experiment, batch) -> tuple[float, float, Optional[str]]:
    """outer_step, then undo an update that left a weight or an optimizer state non-finite.
    Returns (loss, accuracy, None if the update was applied, else what went wrong).

    A finite loss marks the weights it was computed with as good (exp.last_good). An update can
    still overflow (outer.lr=1e300 gives inf weights) or give finite but huge weights (1e30) whose
    next loss is not finite; the first is rolled back here at once, the second by fit() when the
    NaN guard stops the run, so the stop checkpoint never holds weights that gave no finite loss.
    """
    before = snapshot(exp)
    loss, acc, applied = outer_step(exp, batch)
    if applied and state_is_finite(exp):
        exp.last_good = before  # these weights gave a finite loss and a finite update
        return loss, acc, None
    roll_back(exp, before)  # an overflowing optimizer step may have changed some tensors
    if applied:
        return loss, acc, (f"finite outer loss ({loss:.4g}) but an update that left a weight or "
                           "an optimizer state non-finite")
    if not math.isfinite(loss):
        return loss, acc, f"non-finite outer loss ({loss})"
    return loss, acc, (f"finite outer loss ({loss:.4g}) but a non-finite gradient or an "
                       "optimizer step that overflowed")


def train_batches(exp: Experiment, first_step: int, num_steps: int) -> Iterable:
    """This process's share of meta-batches first_step .. first_step+num_steps-1: meta-batch s
    holds training episodes s*T .. s*T+T-1 (T = outer.meta_batch_size), of which rank r takes the
    r-th contiguous share, so a task's episodes never depend on the number of processes."""
    config, tasks, dataset = exp.config, exp.config.outer.meta_batch_size, exp.train_episodes
    pin = exp.device.type == "cuda"
    if not distributed.is_distributed():
        return episode_loader(dataset, first_step * tasks, num_steps * tasks, tasks,
                              config.data.num_workers, pin_memory=pin)
    first, share = distributed.train_share(tasks)
    indices = [s * tasks + first + j for s in range(first_step, first_step + num_steps)
               for j in range(share)]
    if dataset.on_device:
        return (dataset.batch(indices[i:i + share]) for i in range(0, len(indices), share))
    return DataLoader(dataset, sampler=indices, batch_size=share, collate_fn=stack_tasks,
                      num_workers=config.data.num_workers, pin_memory=pin)


def validates(train_cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch `epoch` (1-based) is validated: every val_every epochs from val_from_epoch on
    (earlier ones only with validate_early), and the last one unless it is before val_from_epoch."""
    if epoch < train_cfg.val_from_epoch and not train_cfg.validate_early:
        return False
    return epoch % train_cfg.val_every == 0 or epoch == train_cfg.epochs


def _validate_epoch(exp: Experiment, run_dir: Path, log: RunLog, record: dict, bar: tqdm) -> None:
    """Score the fixed validation tasks; keep best.pt; log and print the epoch."""
    config, state, train_cfg = exp.config, exp.state, exp.config.train
    accs = evaluate(exp.learner, exp.val_episodes, train_cfg.num_val_tasks,
                    train_cfg.eval_batch_size, config.inner.eval_steps, exp.device,
                    config.data.num_workers, desc="validate" if config.run.progress else None)
    mean, ci = mean_confidence_interval(accs)
    # A NaN mean (never expected: the NaN guard keeps the weights finite) never becomes best.pt.
    is_best = (state.epoch >= train_cfg.val_from_epoch and math.isfinite(mean)
               and mean > state.best_val_accuracy)
    if is_best:
        state.best_val_accuracy, state.best_val_ci, state.best_epoch = mean, ci, state.epoch
        save_best(exp, run_dir, mean, ci)
    log.log("val", state.step, epoch=state.epoch, accuracy=mean, ci95=ci, best=is_best,
            best_epoch=state.best_epoch)
    sparsity = (f", mask sparsity {record['mask_sparsity']:.1%}" if "mask_sparsity" in record
                else "")
    bar.write(f"epoch {state.epoch}: train loss {record['loss']:.3f}, val accuracy {mean:.2%} "
              f"+- {ci:.2%}{sparsity}" + (" (best)" if is_best else ""))


def announce_compilation(learner: MetaLearner, bar: tqdm, what: str, announced: set[str]) -> None:
    """Before the first meta-batch (or validation) of outer.implementation=compiled: say that its
    graphs compile now, since that call can take a minute with no progress; once per `what`."""
    if learner.compiled is not None and what not in announced and distributed.is_main_process():
        announced.add(what)
        bar.write(f"compiling the {what} (first use; the time follows) ...")


def report_compilation(learner: MetaLearner, bar: tqdm) -> None:
    """Say which graphs outer.implementation=compiled just compiled, and how long it took."""
    events = learner.compile_events()
    if events and distributed.is_main_process():
        took = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in events)
        bar.write(f"compiled {took} (kernel cache: {compiled.cache_dir()})")


def fit(exp: Experiment, run_dir: Path, log: RunLog,
        should_stop: Callable[[], bool] = lambda: False) -> TrainState:
    """Meta-train for config.train.epochs from exp.state, validating and checkpointing after
    every epoch, every run.checkpoint_every meta-batches, and before raising TrainingStopped
    (should_stop() returned True after a meta-batch) or TrainingDiverged (outer.max_bad_steps
    consecutive non-finite updates, each skipped)."""
    config, learner, state = exp.config, exp.learner, exp.state
    train_cfg, max_bad = config.train, config.outer.max_bad_steps
    bpe, every = train_cfg.batches_per_epoch, config.run.checkpoint_every
    clock = time.time()
    announced: set[str] = set()  # compilations announced (compiled implementation)
    show = config.run.progress and distributed.is_main_process()

    def save() -> Path:  # mid-epoch: carry the epoch's training time so far into the checkpoint
        nonlocal clock
        now = time.time()
        state.epoch_seconds += now - clock
        clock = now
        return save_checkpoint(exp, run_dir, log)

    with tqdm(total=train_cfg.epochs * bpe, initial=state.step, desc="meta-train",
              dynamic_ncols=True, disable=not show) as bar:
        while state.epoch < train_cfg.epochs:
            epoch = state.epoch + 1
            done = state.step - state.epoch * bpe  # this epoch's meta-batches done before (resume)
            # A resumed run restores its RNG states where the uninterrupted run was when it saved:
            # at an epoch end, before this epoch's loader starts; mid-epoch, after it started.
            if done == 0:
                exp.apply_pending_rng()
            batches = iter(train_batches(exp, state.step, bpe - done))
            exp.apply_pending_rng()
            for batch in batches:
                reset_optimizers_if_due(exp)
                announce_compilation(learner, bar, "inner-step and query graphs", announced)
                loss, acc, problem = guarded_step(exp, batch.to(exp.device, non_blocking=True))
                report_compilation(learner, bar)
                state.step += 1
                bar.update(1)
                if problem is None:
                    state.bad_streak = 0
                    state.epoch_losses.append(loss)
                    state.epoch_accuracies.append(acc)
                    bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", acc=f"{acc:.3f}")
                    log.scalars("train_step", state.step, loss=loss, accuracy=acc)
                else:
                    state.bad_streak += 1
                    state.skipped_steps += 1
                    state.epoch_skipped += 1
                    bar.write(f"step {state.step}: {problem}; update skipped ({state.bad_streak} "
                              "in a row)")
                if state.bad_streak >= max_bad:
                    log.log("diverged", state.step, epoch=epoch, bad_streak=state.bad_streak,
                            skipped_steps=state.skipped_steps)
                    if exp.last_good is not None:  # the weights that last gave a finite loss
                        roll_back(exp, exp.last_good)
                    path = save()
                    raise TrainingDiverged(
                        f"stopped: {state.bad_streak} consecutive meta-batches (up to step "
                        f"{state.step}) were skipped, the last for a {problem} "
                        f"(outer.max_bad_steps={max_bad}); the weights in {path} are the last "
                        "good ones. Lower outer.lr, outer.mask_lr or inner.step_size, or set "
                        "outer.grad_clamp.", path)
                if distributed.any_process(should_stop()):  # all processes stop after one step
                    path = save()
                    raise TrainingStopped(f"stopped at step {state.step} (epoch {epoch}); "
                                          f"checkpoint {path}", path)
                if every and state.step % every == 0 and state.step % bpe != 0:
                    save()
            masks = learner.current_masks()  # one draw (a generator's draw uses the RNG) for both
            sparsity = learner.mask_sparsity(masks)
            log.histograms("mask", state.step, masks)
            record = {"epoch": epoch, "loss": float(np.mean(state.epoch_losses or [math.nan])),
                      "accuracy": float(np.mean(state.epoch_accuracies or [math.nan])),
                      "skipped_steps": state.epoch_skipped,
                      "seconds": state.epoch_seconds + time.time() - clock}
            if sparsity:
                record["mask_sparsity"] = float(sparsity.pop("mean"))
                record["layer_sparsity"] = sparsity
            log.log("train", state.step, **record)
            state.epoch, state.epoch_losses, state.epoch_accuracies = epoch, [], []
            state.epoch_skipped, state.epoch_seconds = 0, 0.0
            if validates(train_cfg, epoch):
                announce_compilation(learner, bar, "evaluation graphs", announced)
                _validate_epoch(exp, run_dir, log, record, bar)
                report_compilation(learner, bar)
            path = save_checkpoint(exp, run_dir, log)
            clock = time.time()  # the next epoch's time starts here, validation excluded
            if distributed.any_process(should_stop()):
                raise TrainingStopped(f"stopped after epoch {epoch} (step {state.step}); "
                                      f"checkpoint {path}", path)
    exp.apply_pending_rng()  # resumed a run whose training was already complete
    if state.best_epoch == 0:  # val_from_epoch beyond the last epoch: keep the final weights
        save_best(exp, run_dir, float("nan"), float("nan"))
        if distributed.is_main_process():
            print(f"no validation after train.val_from_epoch={train_cfg.val_from_epoch}: "
                  "best.pt holds the final weights")
    return state
