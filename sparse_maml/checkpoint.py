"""Checkpoints: the file format, the run state they carry, and saving and restoring a run.

A run folder holds `checkpoint-<step>.pt` files (everything needed to continue the run; the newest
`run.keep_checkpoints` are kept) and `best.pt` (the best-validation weights, read by test.py).
Every file is written to a temporary file in the same folder, fsynced and renamed over its name, so
a crash mid-save leaves the previous file as it was and never a truncated file under a real name.
Reading checks the zip container's CRC32 of every record, so a truncated or bit-flipped file raises
CheckpointError naming the file instead of loading garbage. Files are read with
`torch.load(weights_only=True)`: a checkpoint holds tensors and plain Python values only, so a
crafted file cannot run code when it is loaded (one holding anything else is refused). Weights
that are not finite are refused too: a NaN checkpoint is never scored, resumed or made best.pt.

A training checkpoint holds theta, phi (and the generator), both optimizers, the TrainState
(counters, best-validation record, the current epoch's running losses), every RNG state, the bytes
of metrics.jsonl it has seen and the config it was trained with; the training episodes are a pure
function of (run.seed, task index), so the stream position is the step counter. On CPU with the
same settings an interrupted and resumed run writes the same metrics.jsonl (apart from the
wall-clock `seconds` field) and the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import distributed
from .config import Config, ConfigError, load_config, to_dict
from .files import atomic_write
from .run_folder import CONFIG, check_resumable, record_written

BEST = "best.pt"  # best-validation weights (theta, phi, generator)
FORMAT = 2  # version of the training-checkpoint layout written by save_checkpoint
# (2: RNG states as tensors and plain values, loadable with weights_only=True)
_NUMBERED = re.compile(r"checkpoint-(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not one of ours; the message names the file."""


def checkpoint_name(step: int) -> str:
    """File name of the training checkpoint taken after meta-batch `step`."""
    return f"checkpoint-{step:08d}.pt"


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save through files.atomic_write: a crash part-way leaves the old file as it was."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save(obj, f), binary=True)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as RuntimeError
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"could not write checkpoint {path} ({type(err).__name__}: {first}); the previous "
            "checkpoints are intact. Free disk space (or raise the file-size limit) and resume the "
            "run") from err


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by save_atomic, after checking it is complete and intact."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} " + ("is a folder, not a checkpoint file"
                                                       if path.is_dir() else "does not exist"))
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC32
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint "
                              f"({type(err).__name__}: {err})") from err
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: record {bad} fails its CRC check")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: not plain data
        # the 'Unsupported global: ...' clause of torch's message, without its advice
        match = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", str(err))
        refused = f"global {match.group(1)}" if match else "a global"
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values (a file from an "
            f"older version, or a crafted one); it was not loaded, so nothing in it ran (refused "
            f"{refused})") from err
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
                              f"{err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("learner"), dict):
        raise CheckpointError(f"checkpoint {path} is not a sparse_maml checkpoint")
    weights = state["learner"]
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise CheckpointError(f"checkpoint {path}: its weights are not a mapping of names to "
                              "tensors")
    bad = [name for name, t in weights.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(f"checkpoint {path} holds non-finite weights (NaN or inf) in "
                              f"{bad[0]}{more}; it is not used")
    return state


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the numbered checkpoints in `run_dir`, oldest first."""
    matches = [(_NUMBERED.fullmatch(p.name), p) for p in Path(run_dir).glob("checkpoint-*.pt")]
    return sorted((int(match.group(1)), path) for match, path in matches if match)


def prune(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` numbered checkpoints (best.pt is never touched)."""
    removed = [path for _, path in list_checkpoints(run_dir)[:-keep]] if keep > 0 else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete temporary files left by saves that were killed part way."""
    stale = [p for p in Path(run_dir).glob(".*.pt.*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_latest(run_dir: str | Path, report: Callable[[str], None] = print
                ) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest numbered checkpoint that loads, falling back to older ones; None if there is none.

    Each file that fails to load is reported (the message names it). If checkpoints exist but none
    loads, raises CheckpointError listing every failure rather than silently starting over.
    """
    failures = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load(path)
        except CheckpointError as err:
            failures.append(str(err))
            report(f"warning: {err}; trying the previous checkpoint")
    if failures:
        raise CheckpointError(f"no loadable checkpoint in {run_dir}:\n  " + "\n  ".join(failures))
    return None


# -- the run state a training checkpoint carries ---------------------------------------------


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
    # Meta-batches done at the last clear of the outer optimizers (outer.reset_optimizer_every):
    # one reset per reset point, whichever side of it a checkpoint was written.
    optimizer_reset_step: int = 0


def _train_state(saved: Any, path: Path, batches_per_epoch: int) -> TrainState:
    """The TrainState of a checkpoint, each field checked (CheckpointError naming the field)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path}: `state` is not a mapping")
    values = {}
    for f in dataclasses.fields(TrainState):
        if f.name not in saved:  # older checkpoints lack fields added since: their defaults
            continue
        value, where = saved[f.name], f"checkpoint {path}: state.{f.name}"
        if f.type == "int":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"{where} must be a count (an integer >= 0), got "
                                      f"{value!r:.60}")
        elif f.type == "float":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CheckpointError(f"{where} must be a number, got {value!r:.60}")
            value = float(value)
        else:  # the running epoch's losses and accuracies
            if (not isinstance(value, list) or len(value) > batches_per_epoch
                    or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in value)):
                raise CheckpointError(f"{where} must be a list of at most {batches_per_epoch} "
                                      "numbers")
            value = [float(v) for v in value]
        values[f.name] = value
    state = TrainState(**values)
    if state.epoch_seconds < 0 or not math.isfinite(state.epoch_seconds):
        raise CheckpointError(f"checkpoint {path}: state.epoch_seconds={state.epoch_seconds}")
    return state


def rng_states() -> dict:
    """Python, NumPy and torch (CPU, CUDA) random states, as tensors and plain values (so that a
    checkpoint loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
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


def _check_rng_states(states: Any, path: Path) -> None:
    """Refuse RNG states that cannot be restored (tried, then the current states put back)."""
    current = rng_states()
    try:
        set_rng_states(states)
    except Exception as err:  # damaged states fail in many ways inside random, NumPy and torch
        raise CheckpointError(f"checkpoint {path}: its random-generator states are damaged "
                              f"({type(err).__name__}: {str(err)[:80]})") from err
    finally:
        set_rng_states(current)


# -- saving and restoring a run ----------------------------------------------------------------


def save_checkpoint(exp: Any, run_dir: Path, log: Any) -> Path:
    """Checkpoint everything needed to continue this run (an Experiment and its RunLog) as
    checkpoint-<step>.pt; keep the newest run.keep_checkpoints. Returns the path on every process;
    only rank 0 writes."""
    path = Path(run_dir) / checkpoint_name(exp.state.step)
    if not distributed.is_main_process():  # every process holds the same state; rank 0 writes it
        return path
    log.flush()
    record_written(Path(run_dir), path.name)
    save_atomic({
        "format": FORMAT,
        "learner": exp.learner.state_dict(),
        "theta_optimizer": exp.theta_optimizer.state_dict(),
        "mask_optimizer": exp.mask_optimizer.state_dict() if exp.mask_optimizer else None,
        "schedulers": {},  # name -> state_dict, for LR schedulers once there are any
        "state": dataclasses.asdict(exp.state),
        "rng": rng_states(),
        "metrics_bytes": log.size(),
        "config": to_dict(exp.config),
        "inputs": exp.inputs,
    }, path)
    prune(run_dir, exp.config.run.keep_checkpoints)
    return path


def save_best(exp: Any, run_dir: Path, val_accuracy: float, val_ci: float) -> None:
    """Write best.pt (rank 0): the weights test.py and the API read, with their validation score
    and how the run reads its inputs (so evaluating it needs no train data)."""
    if distributed.is_main_process():
        record_written(run_dir, BEST)
        save_atomic({"learner": exp.learner.state_dict(), "epoch": exp.state.epoch,
                     "step": exp.state.step, "val_accuracy": val_accuracy, "val_ci": val_ci,
                     "inputs": exp.inputs}, Path(run_dir) / BEST)


def restore_checkpoint(exp: Any, saved: dict, path: Path) -> None:
    """Load a checkpoint written by save_checkpoint into a freshly built Experiment; every part is
    checked (CheckpointError naming the file and the part) before the run continues."""
    missing = [k for k in ("learner", "theta_optimizer", "mask_optimizer", "state", "rng",
                           "metrics_bytes") if k not in saved]
    if missing or saved.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a training checkpoint of this version "
            f"(format {saved.get('format')!r:.40}, missing {', '.join(missing) or 'nothing'})")
    metrics_bytes = saved["metrics_bytes"]
    if not isinstance(metrics_bytes, int) or isinstance(metrics_bytes, bool) or metrics_bytes < 0:
        raise CheckpointError(f"checkpoint {path}: metrics_bytes must be a byte count, got "
                              f"{metrics_bytes!r:.60}")
    try:
        exp.learner.load_state_dict(saved["learner"])
        if (saved["mask_optimizer"] is None) != (exp.mask_optimizer is None):
            raise ValueError("the checkpoint and the config disagree on whether phi is learned")
        for name, opt in (("theta_optimizer", exp.theta_optimizer),
                          ("mask_optimizer", exp.mask_optimizer)):
            if opt is not None:
                opt.load_state_dict(saved[name])
                _check_optimizer_state(opt, name)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model built from the config: "
                              f"{str(err)[:300]}") from err
    train = exp.config.train
    exp.state = _train_state(saved["state"], path, train.batches_per_epoch)
    done_in_epoch = exp.state.step - exp.state.epoch * train.batches_per_epoch
    if not 0 <= done_in_epoch <= train.batches_per_epoch:
        raise CheckpointError(
            f"checkpoint {path}: step {exp.state.step} after {exp.state.epoch} epochs does not fit "
            f"train.batches_per_epoch={train.batches_per_epoch}")
    if exp.state.epoch > train.epochs:
        raise ConfigError(f"train.epochs={train.epochs}, but {path} has already completed "
                          f"{exp.state.epoch} epochs")
    recorded = saved.get("inputs")  # checkpoints of older versions do not record their inputs
    key = exp.inputs["statistics_key"]
    if isinstance(recorded, dict) and recorded.get("statistics_key") != key:
        raise CheckpointError(
            f"checkpoint {path}: the train images under data.root are not those the run was "
            "normalised with (their content changed, so would the normalisation statistics); "
            "restore them, or start a new run")
    _check_rng_states(saved["rng"], path)
    exp.pending_rng = saved["rng"]


def _check_optimizer_state(opt: torch.optim.Optimizer, name: str) -> None:
    """Each per-parameter state tensor has its parameter's shape and is finite (ValueError)."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    raise ValueError(f"{name}: state {key} is not a tensor")
                if value.ndim and value.shape != p.shape:
                    raise ValueError(f"{name}: state {key} has shape {tuple(value.shape)}, its "
                                     f"parameter {tuple(p.shape)}")
                if value.is_floating_point() and not value.isfinite().all():
                    raise ValueError(f"{name}: state {key} is not finite")


def check_against_checkpoint(config: Config, saved: dict, path: Path) -> None:
    """Refuse a config that differs from the one the checkpoint was trained with (config.yaml
    may have been edited by hand since) in keys a resume may not change."""
    if not isinstance(saved.get("config"), dict):
        return  # checkpoints of older versions do not hold their config
    try:
        used = load_config(None, (), base=saved["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path} holds a config this version cannot read: "
                              f"{err}") from err
    try:
        check_resumable(used, config, path.parent)
    except ConfigError as err:
        raise ConfigError(f"{err}\n(compared with the config stored in {path}, which is what the "
                          f"run used: was {CONFIG} edited by hand?)") from err
