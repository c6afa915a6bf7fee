"""Run folders and what is written into them: config.yaml, metrics.jsonl and TensorBoard events.

A folder that already holds a run is never written over unless asked: `run.overwrite=true` clears
the files a run writes (and only those), `run.resume=auto` or `train.py --resume` continues it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import Config, ConfigError, flatten, load_config, read_yaml, to_dict

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
# Files whose presence means a folder holds a run ("last.pt": the checkpoint of older versions).
RUN_MARKERS = (CONFIG, METRICS, "best.pt", "last.pt", "checkpoint-*.pt")
# Files a run writes into its folder; run.overwrite=true deletes these and nothing else.
RUN_FILES = RUN_MARKERS + ("events.out.tfevents.*", ".*.tmp")

# Keys that may differ between a run's config.yaml and the config it is resumed with: they leave
# the saved model, optimizer state and episode stream valid. Every other change is refused.
RESUMABLE_CHANGES = frozenset({
    "run.name", "run.out_dir", "run.dir", "run.overwrite", "run.resume", "run.device",
    "run.deterministic", "run.tensorboard", "run.progress", "run.keep_checkpoints",
    "run.checkpoint_every",
    "data.root", "data.layout", "data.download", "data.num_workers", "data.on_device",
    "outer.max_bad_steps",
    "train.epochs", "train.val_every", "train.val_from_epoch", "train.validate_early",
    "train.num_test_tasks",
    "train.eval_batch_size", "train.test_after_training",
    "cross_domain.tieredimagenet", "cross_domain.cub", "cross_domain.cars",
})


def holds_run(path: Path) -> bool:
    """Whether `path` already holds (part of) a run: a config, metrics or checkpoints."""
    return any(any(Path(path).glob(pattern)) for pattern in RUN_MARKERS)


def write_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_dir_path(config: Config) -> Path:
    """run.dir, or a new <out_dir>/<name>-<timestamp> folder."""
    if config.run.dir:
        return Path(config.run.dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(config.run.out_dir) / f"{config.run.name}-{stamp}"
    suffix = 1
    while path.exists():  # two runs started in the same second
        path = Path(config.run.out_dir) / f"{config.run.name}-{stamp}-{suffix}"
        suffix += 1
    return path


def _refuse_used(path: Path, config: Config) -> None:
    if holds_run(path) and not config.run.overwrite:
        raise FileExistsError(
            f"run folder {path} already holds a run; continue it with `python train.py --resume "
            f"{path}` (or run.resume=auto), replace it with run.overwrite=true, or choose "
            "another run.dir")


def new_run_dir(config: Config) -> Path:
    """The folder a new run will use; refuses (FileExistsError) one that holds a run unless
    run.overwrite is set. Creates nothing."""
    path = run_dir_path(config)
    _refuse_used(path, config)
    return path


def make_run_dir(config: Config, path: Optional[Path] = None) -> Path:
    """Create the folder of a new run (`path`, default new_run_dir) and write its config.yaml.

    With run.overwrite, the files an earlier run wrote there are deleted first (and only those).
    """
    path = path or new_run_dir(config)
    if holds_run(path):
        _refuse_used(path, config)
        for pattern in RUN_FILES:
            for old in path.glob(pattern):
                if old.is_file():
                    old.unlink()
    path.mkdir(parents=True, exist_ok=True)
    write_config(config, path / CONFIG)
    return path


def config_differences(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every field that differs."""
    before, after = flatten(to_dict(old)), flatten(to_dict(new))
    return {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def check_resumable(old: Config, new: Config, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """Refuse (ConfigError listing each key: old -> new) changes that would invalidate the run.

    Returns the accepted differences.
    """
    changes = config_differences(old, new)
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
    if refused:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from its {CONFIG} in keys that change the "
            f"model, the mask, the optimizers or the episode stream:\n{lines}\n"
            "start a new run for these, or drop the overrides (keys that may change on resume: "
            f"{', '.join(sorted(RESUMABLE_CHANGES))})")
    return changes


class RunLog:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    When a run is resumed, `truncate_to` cuts metrics.jsonl back to the bytes its checkpoint had
    seen and `purge_step` hides TensorBoard events from that step on, so records written after the
    checkpoint (and replayed by the resumed run) appear once.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, truncate_to: Optional[int] = None,
                 purge_step: Optional[int] = None):
        self.path = Path(run_dir) / METRICS
        if truncate_to is not None and self.path.is_file() and self.path.stat().st_size > truncate_to:
            with open(self.path, "r+b") as f:
                f.truncate(truncate_to)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    def size(self) -> int:
        """Bytes written to metrics.jsonl so far (saved in checkpoints)."""
        return self.path.stat().st_size if self.path.is_file() else 0

    def log(self, kind: str, step: int, **values: Any) -> None:
        """Record `values` under `kind` (train, val, test, ...) at global meta-batch `step`."""
        record = {"kind": kind, "step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        self.writer.add_scalar(f"{kind}/{key}/{sub}", v, step)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def scalars(self, kind: str, step: int, **values: float) -> None:
        """TensorBoard only (not metrics.jsonl): scalars under `kind/` at global meta-batch `step`."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def flush(self) -> None:
        """Push TensorBoard events to disk (metrics.jsonl is written line by line)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


class NullRunLog(RunLog):
    """Stands in for RunLog on torchrun processes other than rank 0: writes nothing."""

    def __init__(self) -> None:
        self.writer = None

    def size(self) -> int:
        return 0

    def log(self, kind: str, step: int, **values: Any) -> None:
        pass


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_existing_run(config: Config, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """Check `config` may continue the run in `run_dir` (see check_resumable); returns the changes."""
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"cannot resume {run_dir}: it holds no {CONFIG} (is it a run folder?)")
    try:
        saved = load_config(None, (), base=read_yaml(run_dir / CONFIG))
    except ConfigError as err:
        raise ConfigError(f"cannot resume {run_dir}: its {CONFIG} is not valid: {err}") from err
    return check_resumable(saved, config, run_dir)
