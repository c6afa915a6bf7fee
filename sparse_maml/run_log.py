"""The run's log: metrics.jsonl (one JSON object a line), TensorBoard events beside it (scalars,
the config as text, per-tensor mask histograms, hparams with the final metrics) and the optional
trackers (trackers.py)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .config import Config, write_yaml
from .run_folder import METRICS, record_written
from .trackers import flat_params, open_trackers


class RunLog:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume `truncate_to` cuts metrics.jsonl back to the bytes its checkpoint had seen and
    `purge_step` hides TensorBoard events from that step on, so records the resumed run replays
    appear once; test.py's records after that point are written back (`kept` and `dropped` list
    what was kept and cut). close() releases `lock` (a RunLock). `record=False` (test.py appending
    to a run it did not write) leaves the run's record of its files alone.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, truncate_to: Optional[int] = None,
                 purge_step: Optional[int] = None, lock: Any = None, record: bool = True,
                 config: Optional[Config] = None):
        run_dir = Path(run_dir)
        self.path = run_dir / METRICS
        self.config, self.lock = config, lock
        self.kept: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        if record:
            record_written(run_dir, METRICS)
        if truncate_to is not None and self.size() > truncate_to:
            self._cut(truncate_to)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            before = set(run_dir.glob("events.out.tfevents.*"))
            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)
            self.writer.flush()
            new = set(run_dir.glob("events.out.tfevents.*")) - before
            record_written(run_dir, *sorted(p.name for p in new))
            if config is not None:
                text = io.StringIO()
                write_yaml(config, text)  # indented: Markdown shows it as a code block
                self.writer.add_text("config", "".join(f"    {line}\n" for line in
                                                       text.getvalue().splitlines()))
        # The trackers (W&B, MLflow) the config turns on; test.py's log (no config) has none.
        self.trackers = open_trackers(config, run_dir) if config is not None else []

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
            if (record.get("kind"), record.get("step")) == ("test", -1):  # test.py's: not replayed
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
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        numbers = {}
        for key, value in values.items():
            if isinstance(value, dict):
                numbers |= {f"{key}/{sub}": v for sub, v in value.items()}
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[key] = value
        self.scalars(kind, step, **numbers)

    def scalars(self, kind: str, step: int, **values: float) -> None:
        """Scalars under `kind/` at meta-batch `step`, to TensorBoard and the trackers only."""
        numbers = {f"{kind}/{key}": value for key, value in values.items()}
        if self.writer is not None:
            for tag, value in numbers.items():
                self.writer.add_scalar(tag, value, step)
        for tracker in self.trackers:
            tracker.log(step, numbers)

    def histograms(self, kind: str, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """TensorBoard only: one histogram per tensor under `kind/` (e.g. each layer's mask)."""
        if self.writer is not None:
            for name, tensor in tensors.items():
                self.writer.add_histogram(f"{kind}/{name}", tensor.detach().float().cpu(), step)

    def finish(self, metrics: dict[str, float]) -> None:
        """At the end of training: the config's values with the final `metrics` (TensorBoard's
        hparams view), and each tracker's summary."""
        if self.writer is not None and self.config is not None:
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(flat_params(self.config),
                                   {f"hparam/{k}": v for k, v in metrics.items()}):
                self.writer.file_writer.add_summary(summary)
            for key, value in metrics.items():
                self.writer.add_scalar(f"hparam/{key}", value)
        for tracker in self.trackers:
            tracker.finish(metrics)
        self.trackers = []

    def flush(self) -> None:
        """Push TensorBoard events to disk (metrics.jsonl is written line by line)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush TensorBoard, end the trackers' runs (a stopped run's tracker runs are left
        resumable) and release the run folder's lock."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self.writer is not None:
            self.writer.close()
        if self.lock is not None:
            self.lock.release()


class NullRunLog(RunLog):
    """Stands in for RunLog on torchrun processes other than rank 0: writes nothing."""

    def __init__(self) -> None:
        self.writer = self.config = self.lock = None
        self.trackers, self.kept, self.dropped = [], [], []

    def size(self) -> int:
        return 0

    def log(self, kind: str, step: int, **values: Any) -> None:
        pass
