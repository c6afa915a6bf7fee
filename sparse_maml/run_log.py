"""Run folders and what is written into them: metrics.jsonl and TensorBoard events."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import Config, save_config


def make_run_dir(config: Config) -> Path:
    """The run folder: run.dir, or <out_dir>/<name>-<timestamp>. Refuses to reuse a used folder."""
    if config.run.dir:
        path = Path(config.run.dir)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(config.run.out_dir) / f"{config.run.name}-{stamp}"
        suffix = 1
        while path.exists():  # two runs started in the same second
            path = Path(config.run.out_dir) / f"{config.run.name}-{stamp}-{suffix}"
            suffix += 1
    if (path / "config.yaml").exists() and not config.run.overwrite:
        raise FileExistsError(f"run folder {path} already holds a run; pass run.overwrite=true "
                              "to replace it, or choose another run.dir")
    path.mkdir(parents=True, exist_ok=True)
    save_config(config, path / "config.yaml")
    return path


class RunLog:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir))

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

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
