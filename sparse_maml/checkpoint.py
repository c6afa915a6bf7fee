"""Checkpoints: written atomically, read back with errors that name the file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

BEST = "best.pt"  # best-validation weights (theta, phi, generator)
LAST = "last.pt"  # everything needed to continue training


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not one of ours; the message names the file."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash part-way leaves the previous file untouched, never a truncated one under its name.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by save_atomic."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: "
                              f"{err})") from err
    if not isinstance(state, dict) or "learner" not in state:
        raise CheckpointError(f"checkpoint {path} is not a sparse_maml checkpoint")
    return state
