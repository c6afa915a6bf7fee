"""Reading finished runs for the results table and the figures (utils/collect_results.py,
utils/plot_sparsity.py): which method a config is, which test record of a run counts, and which
runs are seeds of one cell.

A run folder's config is read by run_folder.read_config (validated; nothing imported). A folder
that cannot be read is reported and left out; the others are still read.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import (HOUSEKEEPING, REPLICATE, SEED_POOLED, ConfigError, flatten,
                     keys_with_role, parse_yaml, to_dict)
from .run_folder import CONFIG, METRICS, read_config, read_metrics

METHOD_LABELS = {
    "maml": "MAML", "anil": "ANIL", "boil": "BOIL", "sparse_maml": "sparse-MAML",
    "sparse_relu_maml": "sparse-ReLU-MAML", "sparse_maml_plus": "sparse-MAML+",
    "meta_sgd": "Meta-SGD", "relu_lr": "ReLU lr", "exp_lr": "exp lr", "weight_mask": "weight mask",
}
ARCH_LABELS = {"conv4": "Conv4", "resnet12": "ResNet-12"}
PROTOCOL_NONE = "(none)"  # the label of runs whose run.protocol is empty
# Test-time overrides (test.py) that keep a test record comparable: where the data lives, how the
# run executes, how many test tasks are drawn; data.name names the dataset the record is about (a
# cross-domain row).
SAME_EXPERIMENT = keys_with_role(HOUSEKEEPING, REPLICATE) | {"data.name", "train.num_test_tasks"}


def warn(message: str) -> None:
    """Tell the user on stderr (these are scripts: what is left out or pooled is never silent)."""
    print(f"warning: {message}", file=sys.stderr)


def label(method: str) -> str:
    """The method's name as the paper writes it."""
    return METHOD_LABELS.get(method, method)


def changed_keys(record: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The overrides of a test.py record that change the experiment: keys outside SAME_EXPERIMENT
    whose value differs from the run's config (an override equal to the config changes nothing)."""
    changed = []
    for item in record.get("overrides") or []:
        key, _, raw = item.partition("=")
        if key in SAME_EXPERIMENT:
            continue
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if key not in cfg or json.dumps(value) != json.dumps(cfg[key]):
            if not (isinstance(value, (int, float)) and isinstance(cfg.get(key), (int, float))
                    and not isinstance(value, bool) and value == cfg[key]):
                changed.append(item)
    return changed


def method_of(cfg: dict[str, Any]) -> str:
    """The method of a flat config: maml/anil/boil, sparse_maml, sparse_relu_maml, ..."""
    mask, adapt = cfg["inner.mask"], cfg["inner.adapt"]
    if mask == "none":
        return {"all": "maml", "head": "anil", "body": "boil"}[adapt]
    if mask == "binary_ste":
        if cfg["inner.mask_target"] == "weight":
            method = "weight_mask"
        else:
            method = "sparse_maml_plus" if cfg["inner.mask_generator"] else "sparse_maml"
    else:
        method = {"relu_ste": "sparse_relu_maml", "relu": "relu_lr", "linear": "meta_sgd",
                  "exp": "exp_lr"}[mask]
    return method if adapt == "all" else f"{method}_{adapt}"


@dataclass
class Run:
    """One run folder: its flat config and its records."""

    path: Path
    cfg: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def cell(self) -> tuple[str, str, int, int, str, str]:
        c = self.cfg
        return (method_of(c), c["model.arch"], c["data.num_ways"], c["data.num_shots"], c["data.name"],
                self.protocol)

    @property
    def protocol(self) -> str:
        return self.cfg.get("run.protocol") or PROTOCOL_NONE

    def fingerprint(self) -> tuple:
        return tuple(sorted((k, json.dumps(v)) for k, v in self.cfg.items()
                            if k not in SEED_POOLED))

    def select_tests(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """(dataset -> the test record that counts, one line per test record left out and why).

        Counts: test split, made by train.py or by test.py without an experiment-changing override
        (see changed_keys); of those, the most test tasks, then the latest.
        """
        chosen: dict[str, dict[str, Any]] = {}
        left_out: list[str] = []
        candidates: dict[str, list[dict[str, Any]]] = {}
        for record in self.records:
            if record.get("kind") != "test":
                continue
            dataset = record.get("dataset", self.cfg["data.name"])
            if record.get("split", "test") != "test":
                left_out.append(f"{dataset} record on the {record['split']} split (not a test result)")
                continue
            changed = changed_keys(record, self.cfg)
            if changed:  # e.g. inner.eval_steps=100: another experiment, not this cell
                left_out.append(f"{dataset} record made with {' '.join(changed)} (another experiment)")
                continue
            candidates.setdefault(dataset, []).append(record)
        for dataset, records in candidates.items():
            best = max(range(len(records)), key=lambda i: (int(records[i].get("num_tasks", 0)), i))
            chosen[dataset] = records[best]
            for i, record in enumerate(records):
                if i != best:
                    left_out.append(f"{dataset} record of {record.get('num_tasks', '?')} tasks "
                                    f"({100 * record['accuracy']:.2f}%): the record of "
                                    f"{records[best].get('num_tasks', '?')} tasks counts")
        return chosen, left_out

    def test_results(self) -> dict[str, dict[str, Any]]:
        """Dataset -> the test record that counts (see select_tests)."""
        return self.select_tests()[0]


def report_left_out(runs: list["Run"]) -> None:
    """Warn about every test record that does not count, run by run."""
    for run in runs:
        for reason in run.select_tests()[1]:
            warn(f"{run.path}: left out: {reason}")


def find_runs(paths: list[str]) -> list[Run]:
    """Every run folder (config.yaml + metrics.jsonl) at or below the given paths."""
    folders: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        candidates = [p] if (p / CONFIG).is_file() else sorted(c.parent for c in p.rglob(CONFIG))
        folders += [c for c in candidates if (c / METRICS).is_file() and c not in folders]
    if not folders:
        raise FileNotFoundError(f"no run folder (config.yaml + metrics.jsonl) under {' '.join(paths)}")
    runs = []
    for folder in folders:
        try:
            cfg = flatten(to_dict(read_config(folder)))
            records = read_metrics(folder, warn)
        except (ConfigError, ValueError, OSError) as err:
            warn(f"{folder}: left out: {err}")
            continue
        runs.append(Run(folder, cfg, records))
    if not runs:
        raise FileNotFoundError(f"none of the {len(folders)} run folders under {' '.join(paths)} "
                                "could be read (see the warnings above)")
    return runs


def default_out(runs: list[Run]) -> Path:
    """The common parent folder of the run folders."""
    return Path(os.path.commonpath([str(r.path.resolve().parent) for r in runs]))


