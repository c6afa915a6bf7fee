"""One writer per run folder: a lock file naming the host and process that hold it.

`train.py` takes `<run_dir>/.lock` before it writes anything into a run folder and removes it when
it ends. The file is complete from the moment it exists (written to a temporary file, then
hard-linked to its name, which fails if the name is taken). A lock left by a process that died
(same host, no such process any more) is stale and is taken over; a lock held by a live process, or
by another host (whose processes cannot be checked from here), refuses the second writer with a
message naming the holder. Taking over is atomic: the stale file is first renamed to a name of this
process's own, so of two processes that found it stale only one removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

LOCK = ".lock"
MAX_PID = 2**22  # Linux's largest pid_max: a lock naming a larger (or no positive) pid is damaged


class RunLocked(RuntimeError):
    """Another process holds the run folder; the message names it."""


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return True


def _read(path: Path) -> Optional[dict[str, Any]]:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """The lock of one run folder, held by this process until release()."""

    def __init__(self, run_dir: Path, report: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.report = report
        self.held = False

    def acquire(self) -> "RunLock":
        """Take the lock (taking over a stale one), or raise RunLocked naming the holder."""
        tmp = self.path.with_name(f"{LOCK}.{self.me['pid']}.tmp")
        tmp.write_text(json.dumps(self.me))
        try:
            for _ in range(3):
                try:
                    self._create(tmp)
                    self.held = True
                    return self
                except FileExistsError:
                    self._clear_stale()
            raise RunLocked(f"could not take the lock {self.path}: it keeps changing hands")
        finally:
            tmp.unlink(missing_ok=True)

    def _create(self, tmp: Path) -> None:
        """Make the lock file from `tmp`; FileExistsError if it is taken."""
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: exclusive create, then write
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))

    def _clear_stale(self) -> None:
        holder = _read(self.path)
        if holder is None:  # released meanwhile
            return
        host, pid = holder.get("host"), holder.get("pid")
        if (not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= MAX_PID
                or not isinstance(host, str) or not host):
            raise RunLocked(f"run folder {self.path.parent} is locked by {self.path}, which is "
                            "unreadable; if no process writes the run, delete that file")
        if host != self.me["host"]:
            raise RunLocked(
                f"run folder {self.path.parent} is in use by process {pid} on host {host[:80]} "
                f"(since {str(holder.get('since', '?'))[:40]}); wait for it to end, or, if it is "
                f"gone, delete {self.path}")
        if _alive(pid) and pid != self.me["pid"]:
            raise RunLocked(
                f"run folder {self.path.parent} is in use by process {pid} on this host ({host}, "
                f"since {str(holder.get('since', '?'))[:40]}): two processes cannot write one run; "
                "wait for it to end or stop it")
        moved = self.path.with_name(f"{LOCK}.{self.me['pid']}.stale")
        try:
            os.rename(self.path, moved)  # atomic: of two processes, one moves the stale file
        except FileNotFoundError:  # the other took it over meanwhile
            return
        if _read(moved) != holder:  # moved a lock just taken by another process: put it back
            with contextlib.suppress(OSError):
                os.link(moved, self.path)
            moved.unlink(missing_ok=True)
            return
        moved.unlink(missing_ok=True)
        self.report(f"{self.path.parent}: taking over the lock of process {pid}, which has ended")

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if self.held:
            holder = _read(self.path) or {}
            if (holder.get("pid"), holder.get("host")) == (self.me["pid"], self.me["host"]):
                self.path.unlink(missing_ok=True)
            self.held = False
