"""Reading finished runs for the results table and the figures (utils/collect_results.py,
utils/plot_sparsity.py): which method a config is, which test record of a run counts, and which
runs are seeds of one cell. Configs are read by run_folder.read_config (validated; nothing
imported); a folder that cannot be read is reported and left out, the others are still read.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import SEED_POOLED, ConfigError, flatten, parse_yaml, to_dict
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
SAME_EXPERIMENT = SEED_POOLED | {"data.name", "train.num_test_tasks"}


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
        old = cfg.get(key)
        equal_numbers = (isinstance(value, (int, float)) and not isinstance(value, bool)
                         and isinstance(old, (int, float)) and value == old)  # 1 and 1.0
        if key not in cfg or not (json.dumps(value) == json.dumps(old) or equal_numbers):
            changed.append(item)
    return changed


def method_of(cfg: dict[str, Any]) -> str:
    """The method of a flat config: maml/anil/boil, sparse_maml, sparse_relu_maml, ..."""
    mask, adapt = cfg["inner.mask"], cfg["inner.adapt"]
    if mask == "none":
        return {"all": "maml", "head": "anil", "body": "boil"}[adapt]
    if mask == "binary_ste" and cfg["inner.mask_target"] == "weight":
        method = "weight_mask"
    elif mask == "binary_ste":
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
        return (method_of(c), c["model.arch"], c["data.num_ways"], c["data.num_shots"],
                c["data.name"], self.protocol)

    @property
    def protocol(self) -> str:
        return self.cfg.get("run.protocol") or PROTOCOL_NONE

    def fingerprint(self) -> tuple:
        return tuple(sorted((k, json.dumps(v)) for k, v in self.cfg.items()
                            if k not in SEED_POOLED))

    def select_tests(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """(dataset -> the test record that counts, one line per test record left out and why).
        Counts: test split, no override that changes the experiment (changed_keys); of those, the
        most test tasks, then the latest."""
        left_out: list[str] = []
        candidates: dict[str, list[dict[str, Any]]] = {}
        for record in self.records:
            if record.get("kind") != "test":
                continue
            dataset = record.get("dataset", self.cfg["data.name"])
            if record.get("split", "test") != "test":
                left_out.append(f"{dataset} record on the {record['split']} split (not a test "
                                "result)")
            elif changed := changed_keys(record, self.cfg):  # e.g. inner.eval_steps=100
                left_out.append(f"{dataset} record made with {' '.join(changed)} (another "
                                "experiment)")
            else:
                candidates.setdefault(dataset, []).append(record)
        chosen = {}
        for dataset, records in candidates.items():
            # The most test tasks, then the latest (of equals, max returns the first: reversed).
            best = max(reversed(records), key=lambda r: int(r.get("num_tasks", 0)))
            chosen[dataset] = best
            left_out += [f"{dataset} record of {r.get('num_tasks', '?')} tasks "
                         f"({100 * r['accuracy']:.2f}%): the record of "
                         f"{best.get('num_tasks', '?')} tasks counts" for r in records
                         if r is not best]
        return chosen, left_out

    def test_results(self) -> dict[str, dict[str, Any]]:
        """Dataset -> the test record that counts (see select_tests)."""
        return self.select_tests()[0]


def report_left_out(runs: list[Run]) -> None:
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
        raise FileNotFoundError(f"no run folder (config.yaml + metrics.jsonl) under "
                                f"{' '.join(paths)}")
    runs = []
    for folder in folders:
        try:
            runs.append(Run(folder, flatten(to_dict(read_config(folder))),
                            read_metrics(folder, warn)))
        except (ConfigError, ValueError, OSError) as err:
            warn(f"{folder}: left out: {err}")
    if not runs:
        raise FileNotFoundError(f"none of the {len(folders)} run folders under {' '.join(paths)} "
                                "could be read (see the warnings above)")
    return runs


def default_out(runs: list[Run]) -> Path:
    """The common parent folder of the run folders."""
    return Path(os.path.commonpath([str(r.path.resolve().parent) for r in runs]))
