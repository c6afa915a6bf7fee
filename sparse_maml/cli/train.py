"""Meta-train Sparse-MAML (or a MAML-family baseline) and test the best checkpoint.

    python train.py                                  # the built-in demo (synthetic glyphs, CPU)
    python train.py -c configs/sparse_maml_conv4_5shot.yaml inner.step_size=0.1
    python train.py --resume runs/my_run             # continue a stopped run exactly
    python train.py --resume runs/my_run train.epochs=24   # ... and extend it
    python train.py run.dir=runs/job run.resume=auto # start, or continue if runs/job holds the run
    python train.py -c configs/x.yaml --print-config # the resolved config as YAML; nothing runs

SIGTERM, SIGINT (Ctrl-C) or SIGUSR2 (Slurm's time-limit warning) finishes the current meta-batch,
writes a checkpoint and exits with status 3; a second SIGTERM or SIGINT exits at once. Exit
statuses: 0 done, 1 error (message on stderr), 3 stopped and resumable, 4 stopped by the NaN guard
(outer.max_bad_steps), 130 interrupted before training. See docs/runs.md.

    torchrun --nproc_per_node=4 train.py -c configs/x.yaml   # one meta-batch split over 4 GPUs

Under torchrun each meta-batch and each evaluation is split across the processes, with the same
results as one process; only rank 0 prints and writes the run folder. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from argparse import ArgumentParser, RawTextHelpFormatter
from pathlib import Path
from typing import Any, Optional

from .. import distributed
from ..config import Config, ConfigError, load_config, write_yaml
from ..data import DataError, build_split, check_present, find_bad_images
from ..evaluation import test_checkpoint
from ..resume import open_run
from ..run_folder import holds_run, load_run
from ..run_log import RunLog
from ..runtime import mean_confidence_interval
from ..training import TrainingDiverged, TrainingStopped, fit
from . import lead, print_sparsity, run_command

# Exit statuses besides 0 (done), 1 (error) and 130 (interrupted); Python itself uses 1 and 2.
EXIT_STOPPED = 3  # stopped by SIGTERM/SIGINT/SIGUSR2 after checkpointing: resumable
EXIT_DIVERGED = 4  # the NaN guard stopped the run (a checkpoint of the last good state was written)


class StopSignal:
    """Context manager: the first SIGTERM/SIGINT/SIGUSR2 asks the training loop to stop after the
    current meta-batch (call the object to ask whether one came); a second SIGTERM or SIGINT ends
    the process at once. Installed around fit(), only in the main thread.

    SIGUSR2 is Slurm's (submitit's) warning before a job's time limit; it reaches every process of
    the job and the job's wrapper may pass it on again, so a repeated one never ends the process.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
        elif signum != signal.SIGUSR2:  # a second SIGTERM or SIGINT: die of it, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def load_run_config(config_file: Optional[str], overrides: list[str], resume: Optional[str] = None,
                    trust_code: bool = False) -> tuple[Config, Optional[Path]]:
    """The config, and the run folder to continue (--resume, or run.resume=auto on a used run.dir).
    With --resume the config is the folder's (run_folder.load_run: code it names needs trust_code).
    """
    if resume is not None:
        if config_file:
            raise ConfigError("--resume takes the config from RUN_DIR/config.yaml: pass overrides, "
                              "not -c")
        run_dir = Path(resume)
        # The folder being resumed is the run folder, whatever run.dir says.
        kept = [o for o in overrides if o.partition("=")[0].strip() != "run.dir"]
        config = load_run(run_dir, [*kept, f"run.dir={json.dumps(str(run_dir))}"], trust_code)
        return config, run_dir
    config = load_config(config_file, overrides)
    # The backbone is the one this config names (the user's choice): a folder that names another
    # is refused by the resume's config check, before anything is built.
    used = config.run.resume == "auto" and holds_run(Path(config.run.dir))
    return config, Path(config.run.dir) if used else None


def cross_domain_configs(config: Config, image_size: int) -> list[Config]:
    """One config per configured cross-domain root: its test split, at the training image size."""
    return [dataclasses.replace(config, data=dataclasses.replace(
                config.data, name=name, root=root, layout="auto", image_size=image_size,
                download=False))
            for name, root in dataclasses.asdict(config.cross_domain).items() if root]


def needed_data(config: Config) -> list[tuple[str, Config, str]]:
    """(what, config, split) for every split the run will read: its own train and val (and test),
    and the test split of each cross-domain root."""
    needed = [(f"data.root={config.data.root}", config, s) for s in ("train", "val")]
    if config.train.test_after_training:
        needed.append((f"data.root={config.data.root}", config, "test"))
        needed += [(f"cross_domain.{c.data.name}={c.data.root}", c, "test")
                   for c in cross_domain_configs(config, config.data.image_size)]
    return needed


def check_data_present(config: Config) -> None:
    """Fail at the start, not after hours of training: every split and root the run will read is
    there (found in one of its layouts; no image is read)."""
    for what, cfg, split in needed_data(config):
        try:
            check_present(cfg.data, split)
        except DataError as err:
            raise DataError(f"{what} (needed for the {split} split): {err}") from err


def check_data(config: Config) -> int:
    """--check-data: decode every image the run reads once; print the bad files; 0 if none."""
    bad_total = 0
    for what, cfg, split in needed_data(config):
        # Unnormalised: train statistics would decode the images and stop at the first bad one.
        data_split = build_split(cfg.data, split, normalized=False)
        print(f"checking {data_split.describe()} ({what})", flush=True)
        bad = find_bad_images(data_split)
        for message in bad.first:
            print(f"  bad: {message}")
        if bad.count > len(bad.first):
            print(f"  ... and {bad.count - len(bad.first)} more bad image(s) in this split")
        bad_total += bad.count
    print(f"{bad_total} bad image(s)" if bad_total else "every image decodes")
    return 1 if bad_total else 0


def test_best(config: Config, run_dir: Path, exp, log: RunLog) -> dict[str, float]:
    """Test the best checkpoint on the run's own test split, then on each cross-domain dataset;
    returns {"test_accuracy" (own split), "test_accuracy_<dataset>" (cross-domain): mean}."""
    means = {}
    for test_config in [config, *cross_domain_configs(config, exp.learner.image_size)]:
        accs, info = test_checkpoint(test_config, run_dir, "test", exp.device)
        mean, ci = mean_confidence_interval(accs)
        name = test_config.data.name
        log.log("test", exp.state.step, dataset=name, split="test", accuracy=mean, ci95=ci,
                num_tasks=len(accs), steps=config.inner.eval_steps, epoch=info["epoch"],
                sparsity=info["sparsity"])
        print(f"test accuracy ({name}, {len(accs)} tasks, best checkpoint of epoch "
              f"{info['epoch']}): {mean:.2%} +- {ci:.2%} (95% CI; chance "
              f"{1 / config.data.num_ways:.0%})")
        means["test_accuracy" if test_config is config else f"test_accuracy_{name}"] = mean
    print_sparsity(info["sparsity"])
    return means


def main(config: Config, resume_dir: Optional[Path] = None) -> Path:
    """Train (or continue the run in resume_dir), then test the best checkpoint; returns the run
    folder. Under torchrun this joins the process group first and leaves it at the end; processes
    other than rank 0 print nothing and write no file."""
    device = distributed.setup(config.run.device)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(
                sys.stdout if distributed.is_main_process() else sink):
            return _train(config, resume_dir, device)
    finally:
        distributed.cleanup()


def _train(config: Config, resume_dir: Optional[Path], device) -> Path:
    check_data_present(config)
    exp, run_dir, log = open_run(config, device, resume_dir)
    learner, d, world = exp.learner, config.data, distributed.world_size()
    print(f"run folder: {run_dir}")
    if world > 1:
        print(f"torchrun: {world} processes, {config.outer.meta_batch_size // world} tasks of each "
              f"meta-batch per process")
    print(f"device: {exp.device}; {config.model.arch} with "
          f"{sum(p.numel() for p in learner.theta_parameters()):,} weights, "
          f"{len(learner.inner_names)} tensors adapt in the inner loop, "
          f"mask: {config.inner.mask}{' (generator)' if learner.generator is not None else ''}")
    test_query = f" ({d.test_query} in test tasks)" if d.test_query != d.num_query else ""
    print(f"data: {d.name}, {d.num_ways}-way {d.num_shots}-shot, {d.num_query} queries per class"
          f"{test_query}")
    try:
        with StopSignal() as stop:
            state = fit(exp, run_dir, log, should_stop=stop)
        print(f"best validation accuracy {state.best_val_accuracy:.2%} +- {state.best_val_ci:.2%} "
              f"(epoch {state.best_epoch})")
        final = {"best_val_accuracy": state.best_val_accuracy}
        if config.train.test_after_training:
            final |= test_best(config, run_dir, exp, log)
        log.finish(final)
    finally:
        log.close()
    return run_dir


def cli(argv: list[str] | None = None) -> int:
    """The command line: parse, run, and turn every expected failure into a message on stderr and
    an exit status (0 done, 1 error, 3 stopped, 4 diverged, 130 interrupted); no traceback."""
    parser = ArgumentParser(description=__doc__, formatter_class=RawTextHelpFormatter)
    parser.add_argument("-c", "--config", help="YAML config file (defaults: the built-in demo)")
    parser.add_argument("--resume", metavar="RUN_DIR", help=(
        "continue the run in RUN_DIR from its newest loadable checkpoint, with RUN_DIR/config.yaml "
        "plus the overrides (model-changing ones are refused)"))
    parser.add_argument("--check-data", action="store_true",
                        help="decode every image of every split the run reads, list the files that "
                             "fail, and exit (1 if any failed) without training")
    parser.add_argument("--trust-code", action="store_true",
                        help="with --resume: allow importing the backbone code (model.arch: "
                             "file.py:Class or module:Class) that the run folder names")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file, then overrides) as YAML and exit "
                             "without training or writing anything")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. inner.steps=35")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order

    def run() -> int:
        cfg, to_resume = load_run_config(args.config, args.overrides, args.resume, args.trust_code)
        if args.print_config:
            if lead():
                write_yaml(cfg, sys.stdout)
            return 0
        if args.check_data:
            return check_data(cfg)
        if args.config is None and args.resume is None and not args.overrides and lead():
            print("no -c CONFIG: running the built-in demo (synthetic glyphs)")
        try:
            main(cfg, to_resume)
        except TrainingStopped as stopped:  # every process stops alike: rank 0 says so
            if lead():
                launcher = ("torchrun [same options] train.py" if distributed.env_world_size() > 1
                            else "python train.py")
                print(f"{stopped}\nresume with: {launcher} --resume "
                      f"{stopped.checkpoint_path.parent}", flush=True)
            return EXIT_STOPPED
        except TrainingDiverged as err:
            if lead():
                print(f"error: {err}", file=sys.stderr, flush=True)
            return EXIT_DIVERGED
        return 0

    return run_command(run)
