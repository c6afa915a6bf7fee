"""Evaluate a run's best checkpoint on fixed test tasks; mean accuracy with a 95% interval.

    python test.py runs/my_run                                   # the run's own test split
    python test.py runs/my_run data.name=cub data.root=data/cub  # cross-domain
    python test.py runs/my_run inner.eval_steps=100 --split val
    torchrun --nproc_per_node=4 test.py runs/my_run   # the tasks split over 4 GPUs, same numbers

A run folder received from someone else is opened as data: a backbone it names as code is
imported only with --trust-code, and nothing is downloaded (see docs/runs.md).
"""

from __future__ import annotations

from argparse import ArgumentParser, RawTextHelpFormatter
from pathlib import Path

from .. import distributed
from ..evaluation import test_checkpoint
from ..run_folder import load_run
from ..run_log import RunLog
from ..runtime import mean_confidence_interval
from . import print_sparsity, run_command


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Rebuild a run from its config.yaml, apply overrides, test best.pt; returns (mean, ci95)."""
    parser = ArgumentParser(description=__doc__, formatter_class=RawTextHelpFormatter)
    parser.add_argument("run_dir", help="run folder written by train.py")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. train.num_test_tasks=1000")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--trust-code", action="store_true",
                        help="allow importing the backbone code (model.arch: file.py:Class or "
                             "module:Class) that the run folder names")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    run_dir = Path(args.run_dir)
    config = load_run(run_dir, args.overrides, args.trust_code)
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
    print(f"{config.data.name}/{args.split}: {mean:.2%} +- {ci:.2%} (95% CI over {len(accs)} "
          f"tasks, {config.inner.eval_steps} inner steps, checkpoint of epoch {info['epoch']})")
    print_sparsity(info["sparsity"])
    return mean, ci


def cli(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 1 with a message on stderr (no traceback) on an error."""

    def run() -> int:
        main(argv)
        return 0

    return run_command(run)
