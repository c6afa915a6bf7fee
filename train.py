"""Meta-train Sparse-MAML (or a MAML-family baseline) and test the best checkpoint.

    python train.py                                  # the built-in demo (synthetic glyphs, CPU)
    python train.py -c configs/sparse_maml_conv4_5shot.yaml inner.step_size=0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparse_maml.checkpoint import CheckpointError
from sparse_maml.config import Config, ConfigError, load_config
from sparse_maml.data import DataError
from sparse_maml.run_log import RunLog, make_run_dir
from sparse_maml.runtime import mean_confidence_interval
from sparse_maml.training import build_experiment, fit, test_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-c", "--config", help="YAML config file (defaults: the built-in demo)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. inner.steps=35")
    return parser.parse_args(argv)


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


def main(config: Config) -> Path:
    """Train, then test the best-validation checkpoint; returns the run folder."""
    run_dir = make_run_dir(config)
    exp = build_experiment(config)
    learner = exp.learner
    print(f"run folder: {run_dir}")
    print(f"device: {exp.device}; {config.model.arch} with "
          f"{sum(p.numel() for p in learner.theta_parameters()):,} weights, "
          f"{len(learner.inner_names)} tensors adapt in the inner loop, "
          f"mask: {config.inner.mask}{' (generator)' if learner.generator is not None else ''}")
    print(f"data: {config.data.name}, {config.data.num_ways}-way {config.data.num_shots}-shot, "
          f"{config.data.num_query} queries per class")
    log = RunLog(run_dir, config.run.tensorboard)
    try:
        state = fit(exp, run_dir, log)
        print(f"best validation accuracy {state.best_val_accuracy:.2%} +- {state.best_val_ci:.2%} "
              f"(epoch {state.best_epoch})")
        if config.train.test_after_training:
            accs, info = test_checkpoint(config, run_dir, "test", exp.device)
            mean, ci = mean_confidence_interval(accs)
            log.log("test", state.step, dataset=config.data.name, split="test", accuracy=mean,
                    ci95=ci, num_tasks=len(accs), steps=config.inner.eval_steps,
                    epoch=info["epoch"], sparsity=info["sparsity"])
            chance = 1 / config.data.num_ways
            print(f"test accuracy ({config.data.name}, {len(accs)} tasks, best checkpoint of epoch "
                  f"{info['epoch']}): {mean:.2%} +- {ci:.2%} (95% CI; chance {chance:.0%})")
            print_sparsity(info["sparsity"])
    finally:
        log.close()
    return run_dir


if __name__ == "__main__":
    args = parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        main(cfg)
    except (ConfigError, DataError, CheckpointError, FileExistsError) as err:
        sys.exit(f"error: {err}")
