"""The run's log: metrics.jsonl (one JSON object a line) and TensorBoard events beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .run_folder import METRICS, is_kept_on_resume, record_written


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


