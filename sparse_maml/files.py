"""Writing a file so that a crash never leaves it half written: the one atomic writer."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def fsync_dir(folder: Path) -> None:
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


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash part-way leaves the previous file untouched, never a truncated one under its name; the
    temporary (`.<name>.*.tmp`, which the run folder's clean-up knows) is removed on any error.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
