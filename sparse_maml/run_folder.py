"""The run folder: its files, its rules, and the one reader of a run's config.

A run folder holds config.yaml, metrics.jsonl and TensorBoard events (run_log.py), checkpoints
(checkpoint.py), `.run-files` and a lock (run_lock.py). Every entry point that opens an existing
run (train.py --resume, test.py, the Python API, the results scripts) reads it here (`load_run`,
`read_config`), so the rules for a folder received from someone else are written once:

- its config is read by config.read_yaml (bounded, strict YAML) and validated; nothing is imported;
- a backbone it names as code (`model.arch: file.py:Class` or `module:Class`) is imported only with
  `trust_code` (`--trust-code` on the command line): building the model would run that code;
- a folder that already holds a run is never written over unless asked: `run.overwrite=true`
  clears the files the run wrote (listed, as it wrote them, in `.run-files`; nothing else is
  deleted), `run.resume=auto` or `train.py --resume` continues it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import (RESUMABLE, Config, ConfigError, flatten, is_custom_arch, load_config,
                     parse_overrides, read_yaml, shorten, to_dict, write_yaml)
from .files import atomic_write

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
# Files whose presence means a folder holds a run ("last.pt": the checkpoint of older versions).
RUN_MARKERS = (CONFIG, METRICS, "best.pt", "last.pt", "checkpoint-*.pt")
# The names of the files a run wrote into its folder, one a line, each added before it is first
# written: run.overwrite=true deletes these (and their temporaries) and nothing else.
WRITTEN = ".run-files"


class UntrustedCode(ConfigError):
    """A run folder or checkpoint names a backbone whose code would be imported to build it."""


def read_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config of the run in `run_dir` with dotted `overrides`; ConfigError naming the file if
    there is none or it is not valid. Imports nothing (see load_run for the backbone's code)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.is_file():
        try:  # train.py adds a timestamp to run.name: name the folders it may have meant
            found = sorted(p for p in run_dir.parent.glob(f"{run_dir.name}-*")
                           if (p / CONFIG).is_file())
        except OSError:
            found = []
        hint = f" (run folders beside it: {', '.join(map(str, found[-3:]))})" if found else ""
        raise ConfigError(f"{run_dir} holds no {CONFIG}: is it a run folder written by train.py?"
                          + hint)
    base = read_yaml(path)
    try:
        return load_config(None, list(overrides), base=base)
    except ConfigError as err:
        raise ConfigError(f"{path}{' with the overrides' if overrides else ''}: {err}") from err


def load_run(run_dir: str | Path, overrides: Sequence[str] = (),
             trust_code: bool = False) -> Config:
    """The config of an existing run (read_config); UntrustedCode for a backbone it names as code
    unless `trust_code` or the overrides name model.arch themselves (the caller's own choice)."""
    config = read_config(run_dir, overrides)
    arch = config.model.arch
    chosen = "arch" in parse_overrides(list(overrides)).get("model", {})
    if is_custom_arch(arch) and not (trust_code or chosen):
        where = arch.rpartition(":")[0]
        what = f"the file {where}" if where.endswith(".py") else f"the module {where}"
        raise UntrustedCode(
            f"{Path(run_dir) / CONFIG} names model.arch={shorten(arch)[1:-1]}: building the "
            f"model would import (run) {what}. If you trust that code, pass --trust-code "
            "(trust_code=True in the Python API)")
    return config


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


def remove_stale_temporaries(run_dir: Path, with_files: bool = False) -> list[Path]:
    """Delete the temporaries (`.<name>.*.tmp`) that killed saves of the run's own files left, and
    with `with_files` (run.overwrite=true) those files themselves."""
    run_dir = Path(run_dir)
    removed = []
    for name in written_files(run_dir):
        if "/" in name or name in (".", ".."):  # a record names files of this folder only
            continue
        temporaries = list(run_dir.glob(f".{name}.*.tmp"))
        for path in [run_dir / name, *temporaries] if with_files else temporaries:
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def write_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    record_written(path.parent, path.name)
    atomic_write(path, lambda f: write_yaml(config, f))


def make_folder(path: Path, exist_ok: bool) -> None:
    """mkdir -p, with a message naming the path when it cannot be made (a file in the way, ...)."""
    where = f"run folder {path} (run.dir, or under run.out_dir)"
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if exist_ok or not path.is_dir():
            raise ConfigError(f"{where}: a file of that name is in the way")
        raise
    except OSError as err:  # a file where a parent folder should be, no permission, ...
        raise ConfigError(f"{where} cannot be created: {err.strerror or err}") from err


def _refuse_used(path: Path, config: Config) -> None:
    if holds_run(path) and not config.run.overwrite:
        raise FileExistsError(
            f"run folder {path} already holds a run; continue it with `python train.py --resume "
            f"{path}` (or run.resume=auto), replace it with run.overwrite=true, or choose "
            "another run.dir")


def new_run_dir(config: Config) -> Path:
    """The folder a new run will use: run.dir, refused (FileExistsError) if it holds a run unless
    run.overwrite is set; or a new <out_dir>/<name>-<timestamp>[-<k>] folder, created (empty) here
    so that two runs started in the same second never get the same one (mkdir makes it or fails)."""
    if config.run.dir:
        _refuse_used(Path(config.run.dir), config)
        return Path(config.run.dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in range(10_000):
        name = f"{config.run.name}-{stamp}" + (f"-{suffix}" if suffix else "")
        path = Path(config.run.out_dir) / name
        try:
            make_folder(path, exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"run.out_dir={config.run.out_dir}: no free folder name for "
                      f"{config.run.name}")


def make_run_dir(config: Config, path: Optional[Path] = None) -> Path:
    """Create the folder of a new run (`path`, default new_run_dir) and write its config.yaml.
    With run.overwrite, the files an earlier run recorded there are deleted first (only those)."""
    path = path or new_run_dir(config)
    make_folder(path, exist_ok=True)
    if holds_run(path):
        _refuse_used(path, config)
        if not (path / WRITTEN).is_file():
            raise FileExistsError(
                f"run.overwrite=true: {path} holds a run with no record of the files it wrote "
                f"({WRITTEN}; written by an older version), so nothing there is deleted; delete "
                "the run's files yourself or choose another run.dir")
        remove_stale_temporaries(path, with_files=True)
        (path / WRITTEN).unlink(missing_ok=True)
    write_config(config, path / CONFIG)
    return path


def check_resumable(old: Config, new: Config, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for each field that differs; ConfigError listing those that would
    invalidate the run (not in RESUMABLE)."""
    before, after = flatten(to_dict(old)), flatten(to_dict(new))
    changes = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE}
    if refused:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"cannot resume {run_dir}: the config differs from its {CONFIG} in keys that change "
            f"the model, the mask, the optimizers or the episode stream:\n{lines}\n"
            "start a new run for these, or drop the overrides (keys that may change on resume: "
            f"{', '.join(sorted(RESUMABLE))})")
    return changes


def check_existing_run(config: Config, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """Check `config` may continue the run in `run_dir`; returns the changes (check_resumable)."""
    try:
        saved = read_config(run_dir)
    except ConfigError as err:
        raise ConfigError(f"cannot resume {run_dir}: {err}") from err
    return check_resumable(saved, config, run_dir)


def read_metrics(run_dir: str | Path, warn: Any = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl. A half-written last line (a run still writing, or
    killed mid-write) is skipped, and reported through `warn(message)` if given; a broken line
    elsewhere raises ValueError naming the file and line."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    with open(path, encoding="utf-8", errors="replace") as f:
        numbered = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    records = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number != numbered[-1][0]:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}); the file "
                                 "is damaged: repair or remove that line") from err
            if warn is not None:
                warn(f"{path}: line {number} is incomplete (the run may still be writing it, or "
                     f"was stopped mid-write); skipped: {line[:60]!r}")
            break
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records
