"""Meta-train Sparse-MAML (or a MAML-family baseline) and test the best checkpoint.

    python train.py                                  # the built-in demo (synthetic glyphs, CPU)
    python train.py -c configs/sparse_maml_conv4_5shot.yaml inner.step_size=0.1
    python train.py --resume runs/my_run             # continue a stopped run exactly
    python train.py --resume runs/my_run train.epochs=24   # ... and extend it
    python train.py run.dir=runs/job run.resume=auto # start, or continue if runs/job holds the run

SIGTERM or SIGINT (Ctrl-C) finishes the current meta-batch, writes a checkpoint and exits with
status 3; a second signal exits at once. Exit statuses: 0 done, 1 error (message on stderr),
3 stopped and resumable, 4 stopped by the NaN guard (outer.max_bad_steps). See docs/runs.md.

    torchrun --nproc_per_node=4 train.py -c configs/x.yaml   # one meta-batch split over 4 GPUs

Under torchrun each meta-batch and each evaluation is split across the processes, with the same
results as one process; only rank 0 prints and writes the run folder. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from sparse_maml import distributed
from sparse_maml.checkpoint import CheckpointError
from sparse_maml.config import Config, ConfigError, load_config, read_yaml
from sparse_maml.data import DataError, build_split, check_present, find_bad_images
from sparse_maml.evaluation import test_checkpoint
from sparse_maml.run_log import CONFIG, RunLog, holds_run
from sparse_maml.run_lock import RunLocked
from sparse_maml.runtime import error_message, mean_confidence_interval
from sparse_maml.training import (EXIT_DIVERGED, EXIT_STOPPED, StopSignal, TrainingDiverged,
                                  TrainingStopped, fit, open_run)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-c", "--config", help="YAML config file (defaults: the built-in demo)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest loadable checkpoint, with "
                             "RUN_DIR/config.yaml plus the overrides (model-changing ones are refused)")
    parser.add_argument("--check-data", action="store_true",
                        help="decode every image of every split the run reads, list the files that "
                             "fail, and exit (1 if any failed) without training")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. inner.steps=35")
    return parser.parse_intermixed_args(argv)  # options and overrides in any order


def load_run_config(config_file: Optional[str], overrides: list[str],
                    resume: Optional[str] = None) -> tuple[Config, Optional[Path]]:
    """The config, and the run folder to continue (--resume, or run.resume=auto on a used run.dir)."""
    if resume is not None:
        if config_file:
            raise ConfigError("--resume takes the config from RUN_DIR/config.yaml: pass overrides, "
                              "not -c")
        run_dir = Path(resume)
        if not (run_dir / CONFIG).is_file():
            raise ConfigError(f"--resume {run_dir}: no {CONFIG} there (is it a run folder?)")
        base = read_yaml(run_dir / CONFIG)
        if not isinstance(base.get("run", {}), dict):
            raise ConfigError(f"{run_dir / CONFIG}: run: expected a mapping of RunConfig fields")
        base["run"] = {**base.get("run", {}), "dir": str(run_dir)}
        try:
            config = load_config(None, overrides, base=base)
        except ConfigError as err:
            raise ConfigError(f"--resume {run_dir}: {run_dir / CONFIG} with the overrides: {err}") from err
        # The folder being resumed is the run folder, whatever run.dir says.
        return dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(run_dir))), run_dir
    config = load_config(config_file, overrides)
    if config.run.resume == "auto" and holds_run(Path(config.run.dir)):
        return config, Path(config.run.dir)
    return config, None


def print_sparsity(sparsity: dict[str, float]) -> None:
    """Per-layer mask sparsity as a small table."""
    if not sparsity:
        return
    sparsity = dict(sparsity)
    mean = sparsity.pop("mean")
    print("mask sparsity (fraction of weights with inner-loop learning off):")
    width = max(len(n) for n in sparsity)
    for name, value in sparsity.items():
        print(f"  {name:<{width}}  {value:6.1%}")
    print(f"  {'all masked weights':<{width}}  {mean:6.1%}")


def cross_domain_configs(config: Config, image_size: int) -> list[Config]:
    """One config per configured cross-domain root: its test split, at the training image size."""
    configs = []
    for name, root in dataclasses.asdict(config.cross_domain).items():
        if root:
            data = dataclasses.replace(config.data, name=name, root=root, layout="auto",
                                       image_size=image_size, download=False)
            configs.append(dataclasses.replace(config, data=data))
    return configs


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
        data_split = build_split(cfg.data, split)
        print(f"checking {data_split.describe()} ({what})", flush=True)
        bad = find_bad_images(data_split)
        for message in bad:
            print(f"  bad: {message}")
        bad_total += len(bad)
    print(f"{bad_total} bad image(s)" if bad_total else "every image decodes")
    return 1 if bad_total else 0


def test_best(config: Config, run_dir: Path, exp, log: RunLog) -> None:
    """Test the best checkpoint on the run's own test split, then on each cross-domain dataset."""
    for test_config in [config, *cross_domain_configs(config, exp.learner.image_size)]:
        accs, info = test_checkpoint(test_config, run_dir, "test", exp.device)
        mean, ci = mean_confidence_interval(accs)
        name = test_config.data.name
        log.log("test", exp.state.step, dataset=name, split="test", accuracy=mean, ci95=ci,
                num_tasks=len(accs), steps=config.inner.eval_steps, epoch=info["epoch"],
                sparsity=info["sparsity"])
        chance = 1 / config.data.num_ways
        print(f"test accuracy ({name}, {len(accs)} tasks, best checkpoint of epoch "
              f"{info['epoch']}): {mean:.2%} +- {ci:.2%} (95% CI; chance {chance:.0%})")
    print_sparsity(info["sparsity"])


def main(config: Config, resume_dir: Optional[Path] = None) -> Path:
    """Train (or continue the run in resume_dir), then test the best checkpoint; returns the run
    folder.

    Under torchrun (WORLD_SIZE > 1) this joins the process group first and leaves it at the end;
    processes other than rank 0 print nothing and write no file.
    """
    device = distributed.setup(config.run.device)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(
                sys.stdout if distributed.is_main_process() else sink):
            return _train(config, resume_dir, device)
    finally:
        distributed.cleanup()


def _train(config: Config, resume_dir: Optional[Path], device) -> Path:
    """main() once the device (and process group) is set up."""
    check_data_present(config)
    exp, run_dir, log = open_run(config, device, resume_dir)
    learner = exp.learner
    print(f"run folder: {run_dir}")
    world = distributed.world_size()
    if world > 1:
        print(f"torchrun: {world} processes, {config.outer.meta_batch_size // world} tasks of each "
              f"meta-batch per process")
    print(f"device: {exp.device}; {config.model.arch} with "
          f"{sum(p.numel() for p in learner.theta_parameters()):,} weights, "
          f"{len(learner.inner_names)} tensors adapt in the inner loop, "
          f"mask: {config.inner.mask}{' (generator)' if learner.generator is not None else ''}")
    d = config.data
    test_query = f" ({d.test_query} in test tasks)" if d.test_query != d.num_query else ""
    print(f"data: {d.name}, {d.num_ways}-way {d.num_shots}-shot, {d.num_query} queries per class"
          f"{test_query}")
    try:
        with StopSignal() as stop:
            state = fit(exp, run_dir, log, should_stop=stop)
        print(f"best validation accuracy {state.best_val_accuracy:.2%} +- {state.best_val_ci:.2%} "
              f"(epoch {state.best_epoch})")
        if config.train.test_after_training:
            test_best(config, run_dir, exp, log)
    finally:
        log.close()
    return run_dir


def cli(argv: list[str] | None = None) -> int:
    """The command line: parse, run, and turn every expected failure into a message on stderr and
    an exit status (0 done, 1 error, 3 stopped, 4 diverged); no traceback reaches the user."""
    args = parse_args(argv)
    # Under torchrun these errors happen on every process alike: rank 0 reports them.
    lead = os.environ.get("RANK", "0") == "0"
    try:
        cfg, resume_from = load_run_config(args.config, args.overrides, args.resume)
        if args.check_data:
            return check_data(cfg)
        if args.config is None and args.resume is None and not args.overrides and lead:
            print("no -c CONFIG: running the built-in demo (synthetic glyphs)")
        main(cfg, resume_from)
    except TrainingStopped as stopped:
        if lead:
            launcher = ("torchrun [same options] train.py" if distributed.env_world_size() > 1
                        else "python train.py")
            print(f"{stopped}\nresume with: {launcher} --resume {stopped.checkpoint_path.parent}",
                  flush=True)
        return EXIT_STOPPED
    except TrainingDiverged as err:
        if lead:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except (ConfigError, DataError, CheckpointError, RunLocked, OSError, MemoryError,
            torch.OutOfMemoryError) as err:
        if lead:
            print(f"error: {error_message(err)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
