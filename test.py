"""Evaluate a run's best checkpoint on fixed test tasks; mean accuracy with a 95% interval.

    python test.py runs/my_run                                   # the run's own test split
    python test.py runs/my_run data.name=cub data.root=data/cub  # cross-domain
    python test.py runs/my_run inner.eval_steps=100 --split val
    torchrun --nproc_per_node=4 test.py runs/my_run   # the tasks split over 4 GPUs, same numbers
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from sparse_maml import distributed
from sparse_maml.checkpoint import CheckpointError
from sparse_maml.config import ConfigError, load_config, read_yaml
from sparse_maml.data import DataError
from sparse_maml.run_log import RunLog
from sparse_maml.runtime import error_message, mean_confidence_interval
from sparse_maml.evaluation import test_checkpoint
from train import print_sparsity


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Rebuild a run from its config.yaml, apply overrides, test best.pt; returns (mean, ci95)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("run_dir", help="run folder written by train.py")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_test_tasks=1000")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} holds no config.yaml: is it a run folder written by train.py?")
    config = load_config(None, args.overrides, base=read_yaml(run_dir / "config.yaml"))
    device = distributed.setup(config.run.device)
    try:
        accs, info = test_checkpoint(config, run_dir, args.split, device)
        main_process = distributed.is_main_process()
    finally:
        distributed.cleanup()
    mean, ci = mean_confidence_interval(accs)
    if not main_process:  # every process has the same numbers; rank 0 reports them
        return mean, ci
    log = RunLog(run_dir, tensorboard=False, record=False)
    log.log("test", -1, dataset=config.data.name, split=args.split, accuracy=mean, ci95=ci,
            num_tasks=len(accs), steps=config.inner.eval_steps, epoch=info["epoch"],
            overrides=args.overrides)
    print(f"{config.data.name}/{args.split}: {mean:.2%} +- {ci:.2%} (95% CI over {len(accs)} tasks, "
          f"{config.inner.eval_steps} inner steps, checkpoint of epoch {info['epoch']})")
    print_sparsity(info["sparsity"])
    return mean, ci


def cli(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 1 with a message on stderr (no traceback) on an error."""
    try:
        main(argv)
    except (ConfigError, DataError, CheckpointError, OSError, MemoryError,
            torch.OutOfMemoryError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error_message(err)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
