"""Where a run came from: provenance.jsonl in the run folder, one JSON record per start or resume
(command line, working folder, git commit and whether the checkout had changes, Python, torch and
CUDA versions, device, host, time). Appended, never rewritten in place: the file is written whole
to a temporary and renamed (files.atomic_write), so a crash leaves the previous version."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .files import atomic_write
from .run_folder import record_written

PROVENANCE = "provenance.jsonl"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the checkout (or site-packages) holding it


def git_state(folder: Path = PACKAGE_ROOT) -> Optional[dict[str, Any]]:
    """{"commit", "dirty"} of the git checkout holding `folder`; None outside one or without git.
    `dirty` is whether tracked files differ from the commit (untracked files do not count)."""
    git = ["git", "-C", str(folder)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(),
            "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def provenance_record(event: str, device: Optional[torch.device] = None) -> dict[str, Any]:
    """What this process is: the record `record_provenance` appends."""
    record: dict[str, Any] = {
        "event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": [sys.executable, *sys.argv], "cwd": str(Path.cwd()),
        "host": socket.gethostname(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA version torch was built with (None: a CPU build)
        "device": str(device) if device is not None else None, "git": git_state()}
    if device is not None and device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def record_provenance(run_dir: Path, event: str, device: Optional[torch.device] = None) -> None:
    """Append one record (`event`: start or resume) to run_dir/provenance.jsonl."""
    path = Path(run_dir) / PROVENANCE
    record_written(Path(run_dir), PROVENANCE)
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    line = json.dumps(provenance_record(event, device)) + "\n"
    atomic_write(path, lambda f: f.write(before + line))
