"""Checkpoints: written atomically, verified when read, numbered by step and pruned.

A run folder holds `checkpoint-<step>.pt` files (everything needed to continue the run; the newest
`run.keep_checkpoints` are kept) and `best.pt` (the best-validation weights, read by test.py).
Every file is written to a temporary file in the same folder, fsynced and renamed over its name, so
a crash mid-save leaves the previous file as it was and never a truncated file under a real name.
Reading checks the zip container's CRC32 of every record, so a truncated or bit-flipped file raises
CheckpointError naming the file instead of loading garbage. Files are read with
`torch.load(weights_only=True)`: a checkpoint holds tensors and plain Python values only, so a
crafted file cannot run code when it is loaded (one holding anything else is refused).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

BEST = "best.pt"  # best-validation weights (theta, phi, generator)
FORMAT = 2  # version of the training-checkpoint layout written by training.save_checkpoint
# (2: RNG states as tensors and plain values, loadable with weights_only=True)
_NUMBERED = re.compile(r"checkpoint-(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not one of ours; the message names the file."""


def checkpoint_name(step: int) -> str:
    """File name of the training checkpoint taken after meta-batch `step`."""
    return f"checkpoint-{step:08d}.pt"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash part-way leaves the previous file untouched, never a truncated one under its name.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as RuntimeError
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write checkpoint {path} ({_first_line(err)}); the previous checkpoints are "
            "intact. Free disk space (or raise the file-size limit) and resume the run") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by save_atomic, after checking it is complete and intact."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
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
    except pickle.UnpicklingError as err:  # weights_only refused a global: not tensors and plain data
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values (a file from an "
            f"older version, or a crafted one); it was not loaded, so nothing in it ran "
            f"({_refused_global(err)})") from err
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
                              f"{err})") from err
    if not isinstance(state, dict) or "learner" not in state:
        raise CheckpointError(f"checkpoint {path} is not a sparse_maml checkpoint")
    return state


def _refused_global(err: Exception) -> str:
    """The 'Unsupported global: ...' clause of torch's weights_only error, without its advice."""
    match = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", str(err))
    return f"refused global {match.group(1)}" if match else "refused a global"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the numbered checkpoints in `run_dir`, oldest first."""
    found = []
    for path in Path(run_dir).glob("checkpoint-*.pt"):
        match = _NUMBERED.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


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


def load_latest(run_dir: str | Path, report: Callable[[str], None] = print,
                map_location: Any = "cpu") -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest numbered checkpoint that loads, falling back to older ones; None if there is none.

    Each file that fails to load is reported (the message names it). If checkpoints exist but none
    loads, raises CheckpointError listing every failure rather than silently starting over.
    """
    failures = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load(path, map_location)
        except CheckpointError as err:
            failures.append(str(err))
            report(f"warning: {err}; trying the previous checkpoint")
    if failures:
        raise CheckpointError(f"no loadable checkpoint in {run_dir}:\n  " + "\n  ".join(failures))
    return None
