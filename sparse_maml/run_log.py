"""Run folders and what is written into them: config.yaml, metrics.jsonl and TensorBoard events.

A folder that already holds a run is never written over unless asked: `run.overwrite=true` clears
the files the run wrote (listed, as it wrote them, in `.run-files`; nothing else is deleted),
`run.resume=auto` or `train.py --resume` continues it.
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
# The names of the files a run wrote into its folder, one a line, each added before it is first
# written: run.overwrite=true deletes these (and their temporaries) and nothing else.
WRITTEN = ".run-files"

# Keys that may differ between a run's config.yaml and the config it is resumed with: they leave
# the saved model, optimizer state and episode stream valid. Every other change is refused.
RESUMABLE_CHANGES = frozenset({
    "run.name", "run.out_dir", "run.dir", "run.overwrite", "run.resume", "run.device",
    "run.deterministic", "run.tensorboard", "run.progress", "run.keep_checkpoints",
    "run.checkpoint_every",
    "data.root", "data.layout", "data.download", "data.num_workers", "data.on_device",
    "outer.max_bad_steps", "outer.implementation", "outer.compile_mode",
    "outer.checkpoint_inner_steps",
    "train.epochs", "train.val_every", "train.val_from_epoch", "train.validate_early",
    "train.num_test_tasks", "data.num_test_query",
    "train.eval_batch_size", "train.test_after_training",
    "cross_domain.tieredimagenet", "cross_domain.cub", "cross_domain.cars",
})


def holds_run(path: Path) -> bool:
    """Whether `path` already holds (part of) a run: a config, metrics or checkpoints."""
    return any(any(Path(path).glob(pattern)) for pattern in RUN_MARKERS)


def written_files(run_dir: Path) -> list[str]:
    """Names of the files the run in `run_dir` recorded as written by it (record_written)."""
    path = Path(run_dir) / WRITTEN
    return path.read_text().split() if path.is_file() else []


def record_written(run_dir: Path, *names: str) -> None:
    """Add `names` (files in run_dir this run is about to write) to the run's record."""
    known = set(written_files(run_dir))
    new = [n for n in names if n not in known]
    if new:
        with open(Path(run_dir) / WRITTEN, "a") as f:
            f.write("".join(f"{n}\n" for n in new))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporaries (`.<name>.*.tmp`) that killed saves of the run's own files left."""
    run_dir = Path(run_dir)
    stale = [p for name in written_files(run_dir) if "/" not in name
             for p in run_dir.glob(f".{name}.*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def remove_written(run_dir: Path) -> list[Path]:
    """Delete the files the run in `run_dir` recorded (with their temporaries) and the record."""
    run_dir = Path(run_dir)
    removed = []
    for name in written_files(run_dir):
        if "/" in name or name in ("", ".", ".."):  # a record names files of this folder only
            continue
        for path in [run_dir / name, *run_dir.glob(f".{name}.*.tmp")]:
            if path.is_file():
                path.unlink()
                removed.append(path)
    (run_dir / WRITTEN).unlink(missing_ok=True)
    return removed


def write_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    record_written(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_folder(path: Path, exist_ok: bool) -> None:
    """mkdir -p, with a message naming the path when it cannot be made (a file in the way, ...)."""
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if exist_ok or not path.is_dir():
            raise ConfigError(f"run folder {path} (run.dir, or under run.out_dir): a file of that "
                              "name is in the way")
        raise
    except OSError as err:  # a file where a parent folder should be, no permission, ...
        raise ConfigError(f"run folder {path} (run.dir, or under run.out_dir) cannot be created: "
                          f"{err.strerror or err}") from err


def run_dir_path(config: Config) -> Path:
    """run.dir, or a new <out_dir>/<name>-<timestamp>[-<k>] folder, created here so that two runs
    started in the same second never get the same one (mkdir either makes it or fails)."""
    if config.run.dir:
        return Path(config.run.dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in range(10_000):
        path = Path(config.run.out_dir) / f"{config.run.name}-{stamp}{f'-{suffix}' if suffix else ''}"
        try:
            make_folder(path, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"run.out_dir={config.run.out_dir}: no free folder name for {config.run.name}")


def _refuse_used(path: Path, config: Config) -> None:
    if holds_run(path) and not config.run.overwrite:
        raise FileExistsError(
            f"run folder {path} already holds a run; continue it with `python train.py --resume "
            f"{path}` (or run.resume=auto), replace it with run.overwrite=true, or choose "
            "another run.dir")


def new_run_dir(config: Config) -> Path:
    """The folder a new run will use; refuses (FileExistsError) one that holds a run unless
    run.overwrite is set. Creates only a new time-stamped folder (empty)."""
    path = run_dir_path(config)
    _refuse_used(path, config)
    return path


def make_run_dir(config: Config, path: Optional[Path] = None) -> Path:
    """Create the folder of a new run (`path`, default new_run_dir) and write its config.yaml.

    With run.overwrite, the files an earlier run recorded as written there are deleted first (and
    only those); a folder holding a run without that record is refused.
    """
    path = path or new_run_dir(config)
    make_folder(path, exist_ok=True)
    if holds_run(path):
        _refuse_used(path, config)
        if not (path / WRITTEN).is_file():
            raise FileExistsError(
                f"run.overwrite=true: {path} holds a run with no record of the files it wrote "
                f"({WRITTEN}; written by an older version), so nothing there is deleted; delete "
                "the run's files yourself or choose another run.dir")
        remove_written(path)
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


def is_kept_on_resume(record: dict[str, Any]) -> bool:
    """Records a resume never cuts: test.py's evaluations (kind test, step -1), which the resumed
    run does not replay."""
    return record.get("kind") == "test" and record.get("step") == -1


class RunLog:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    When a run is resumed, `truncate_to` cuts metrics.jsonl back to the bytes its checkpoint had
    seen and `purge_step` hides TensorBoard events from that step on, so records written after the
    checkpoint (and replayed by the resumed run) appear once. test.py's records after that point
    are kept (written back after the cut); `kept` and `dropped` list what was kept and cut.
    `lock` (a RunLock) is released by close(). `record=False` (test.py appending to a run it did
    not write) leaves the run's record of its files alone.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, truncate_to: Optional[int] = None,
                 purge_step: Optional[int] = None, lock: Any = None, record: bool = True):
        self.path = Path(run_dir) / METRICS
        self.lock = lock
        self.kept: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        if record:
            record_written(Path(run_dir), METRICS)
        if truncate_to is not None and self.path.is_file() and self.path.stat().st_size > truncate_to:
            self._cut(truncate_to)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            before = set(Path(run_dir).glob("events.out.tfevents.*"))
            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)
            self.writer.flush()
            record_written(Path(run_dir), *sorted(p.name for p in
                                                   set(Path(run_dir).glob("events.out.tfevents.*")) - before))

    def _cut(self, size: int) -> None:
        """Truncate metrics.jsonl to `size` bytes, then append back test.py's records after it."""
        with open(self.path, "rb") as f:
            f.seek(size)
            tail = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        kept_lines = []
        for line in tail:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by a crash: nothing to keep
                continue
            if not isinstance(record, dict):
                continue
            if is_kept_on_resume(record):
                self.kept.append(record)
                kept_lines.append(line if line.endswith("\n") else line + "\n")
            else:
                self.dropped.append(record)
        with open(self.path, "r+b") as f:
            f.truncate(size)
            f.seek(size)
            f.write("".join(kept_lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

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
        """Flush TensorBoard and release the run folder's lock."""
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()


class NullRunLog(RunLog):
    """Stands in for RunLog on torchrun processes other than rank 0: writes nothing."""

    def __init__(self) -> None:
        self.writer = None
        self.lock = None
        self.kept, self.dropped = [], []

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
