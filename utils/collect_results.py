"""Summarise run folders as the paper's results table, with intervals, beside the paper's numbers.

    python utils/collect_results.py runs/                       # every run folder under runs/
    python utils/collect_results.py runs/a runs/b --out results/

Each run is identified from its config.yaml (method from inner.*, model.arch, data.num_shots),
never from its folder name. Runs whose configs agree on everything but run.* (seed, name, folder)
and housekeeping keys are seeds of one cell: one seed gives "mean ± 95% CI" over its test tasks,
several give "mean ± std over seeds (n=K)". Runs of one cell that differ in anything else (a sweep
over inner.step_size, say) stay separate rows, labelled by the keys that differ. Test records of
another dataset than the training one (tieredImageNet, CUB, Cars after MiniImageNet training)
become cross-domain rows. Writes results.md and results.csv into --out (default: the common parent
folder of the runs found) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_maml.config import Config, flatten, to_dict  # noqa: E402

PAPER_FILE = ROOT / "configs" / "paper_results.yaml"
METHOD_LABELS = {
    "maml": "MAML", "anil": "ANIL", "boil": "BOIL", "sparse_maml": "sparse-MAML",
    "sparse_relu_maml": "sparse-ReLU-MAML", "sparse_maml_plus": "sparse-MAML+",
    "meta_sgd": "Meta-SGD", "relu_lr": "ReLU lr", "exp_lr": "exp lr", "weight_mask": "weight mask",
}
ARCH_LABELS = {"conv4": "Conv4", "resnet12": "ResNet-12"}
# Keys that do not change the experiment: runs differing only here are seeds of one cell.
HOUSEKEEPING = ("run.", "data.root", "data.layout", "data.download", "data.num_workers",
                "data.on_device", "outer.implementation", "train.eval_batch_size",
                "train.test_after_training", "outer.max_bad_steps")
# Test-time overrides (test.py) that keep a record comparable: where the data lives.
DATA_LOCATION = ("data.name", "data.root", "data.layout", "data.download", "data.num_workers",
                 "data.on_device", "train.eval_batch_size", "run.")


DEFAULTS = flatten(to_dict(Config()))


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
    def cell(self) -> tuple[str, str, int, int, str]:
        c = self.cfg
        return (method_of(c), c["model.arch"], c["data.num_ways"], c["data.num_shots"], c["data.name"])

    def fingerprint(self) -> tuple:
        return tuple(sorted((k, json.dumps(v)) for k, v in self.cfg.items()
                            if not k.startswith(HOUSEKEEPING)))

    def test_results(self) -> dict[str, dict[str, Any]]:
        """The last comparable test record of each dataset (test split only)."""
        found: dict[str, dict[str, Any]] = {}
        for record in self.records:
            if record.get("kind") != "test" or record.get("split", "test") != "test":
                continue
            overrides = [o.partition("=")[0] for o in record.get("overrides") or []]
            if any(not key.startswith(DATA_LOCATION) for key in overrides):
                continue  # e.g. inner.eval_steps=100: another experiment, not this cell
            found[record.get("dataset", self.cfg["data.name"])] = record
        return found


def find_runs(paths: list[str]) -> list[Run]:
    """Every run folder (config.yaml + metrics.jsonl) at or below the given paths."""
    folders: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        candidates = [p] if (p / "config.yaml").is_file() else sorted(
            c.parent for c in p.rglob("config.yaml"))
        folders += [c for c in candidates if (c / "metrics.jsonl").is_file() and c not in folders]
    if not folders:
        raise FileNotFoundError(f"no run folder (config.yaml + metrics.jsonl) under {' '.join(paths)}")
    runs = []
    for folder in folders:
        with open(folder / "config.yaml") as f:
            cfg = {**DEFAULTS, **flatten(yaml.safe_load(f) or {})}
        with open(folder / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
        runs.append(Run(folder, cfg, records))
    return runs


def load_paper(path: Path = PAPER_FILE) -> dict[tuple[str, str, int], float]:
    """(method, arch, shots) -> the paper's accuracy in % (MiniImageNet, 5-way)."""
    with open(path) as f:
        tree = yaml.safe_load(f)
    return {(m, a, int(s)): v for m, archs in tree["accuracy"].items()
            for a, shots in archs.items() for s, v in shots.items() if v is not None}


@dataclass
class Row:
    """One line of the table: a cell (or a variant of it) on one test dataset."""

    method: str
    arch: str
    ways: int
    shots: int
    train_dataset: str
    dataset: str
    variant: str
    accuracies: list[float]  # one per seed, in %
    ci95: list[float]  # per seed, in %
    num_tasks: list[int]
    runs: list[str] = field(default_factory=list)
    paper: float | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def spread(self) -> float:
        """95% CI over test tasks (one seed) or std over seeds (several)."""
        if len(self.accuracies) == 1:
            return self.ci95[0]
        return statistics.stdev(self.accuracies)

    def result_text(self) -> str:
        if len(self.accuracies) == 1:
            return f"{self.mean:.2f} ± {self.spread:.2f}"
        return f"{self.mean:.2f} ± {self.spread:.2f} (std, n={len(self.accuracies)})"

    @property
    def cross_domain(self) -> bool:
        return self.dataset != self.train_dataset


def build_rows(runs: list[Run], paper: dict[tuple[str, str, int], float]) -> list[Row]:
    """Group runs into cells and variants; one row per (variant, test dataset)."""
    groups: dict[tuple, dict[tuple, list[Run]]] = {}
    for run in runs:
        if run.test_results():
            groups.setdefault(run.cell, {}).setdefault(run.fingerprint(), []).append(run)
    rows = []
    for cell, variants in groups.items():
        method, arch, ways, shots, train_dataset = cell
        labels = variant_labels(variants)
        for fingerprint, members in variants.items():
            seeds = [run.cfg["run.seed"] for run in members]
            if len(set(seeds)) < len(seeds):
                print(f"warning: runs with the same config and run.seed are counted as separate "
                      f"seeds: {', '.join(str(r.path) for r in members)}", file=sys.stderr)
            per_dataset: dict[str, list[tuple[Run, dict]]] = {}
            for run in members:
                for dataset, record in run.test_results().items():
                    per_dataset.setdefault(dataset, []).append((run, record))
            for dataset, pairs in per_dataset.items():
                ref = paper.get((method, arch, shots)) if (
                    dataset == train_dataset == "miniimagenet" and ways == 5) else None
                rows.append(Row(
                    method, arch, ways, shots, train_dataset, dataset, labels[fingerprint],
                    accuracies=[100 * r["accuracy"] for _, r in pairs],
                    ci95=[100 * r.get("ci95", math.nan) for _, r in pairs],
                    num_tasks=[int(r.get("num_tasks", 0)) for _, r in pairs],
                    runs=[str(run.path) for run, _ in pairs], paper=ref))
    return sorted(rows, key=sort_key)


def variant_labels(variants: dict[tuple, list[Run]]) -> dict[tuple, str]:
    """Name each variant of a cell by the config keys whose values differ between variants."""
    if len(variants) == 1:
        return {fp: "" for fp in variants}
    dicts = {fp: dict(fp) for fp in variants}
    keys = sorted({k for d in dicts.values() for k in d})
    differing = [k for k in keys if len({d.get(k) for d in dicts.values()}) > 1]
    return {fp: ", ".join(f"{k}={json.loads(d[k]) if k in d else '?'}" for k in differing)
            for fp, d in dicts.items()}


def sort_key(row: Row) -> tuple:
    methods = list(METHOD_LABELS)
    method_rank = methods.index(row.method) if row.method in methods else len(methods)
    return (row.train_dataset, row.arch != "conv4", row.arch, -row.shots, row.cross_domain,
            row.dataset, method_rank, row.method, row.variant)


def label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


COLUMNS = ["method", "arch", "shots", "trained on", "tested on", "variant", "accuracy (%)",
           "paper (%)", "seeds", "test tasks"]


def markdown(rows: list[Row]) -> str:
    """The full table, then the paper-style grid (settings x methods) of the in-domain cells."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        tested = r.dataset + (" (cross-domain)" if r.cross_domain else "")
        lines.append("| " + " | ".join([
            label(r.method), ARCH_LABELS.get(r.arch, r.arch), f"{r.ways}-way {r.shots}-shot",
            r.train_dataset, tested, r.variant or "", r.result_text(),
            "–" if r.paper is None else f"{r.paper:.2f}", str(len(r.accuracies)),
            "/".join(sorted({str(n) for n in r.num_tasks})),
        ]) + " |")
    text = "\n".join(lines) + "\n\n" + (
        "Accuracy: mean ± 95% confidence interval over the test tasks (one seed), or mean ± standard "
        "deviation over seeds (n seeds). Paper: von Oswald et al. 2021, Table 1 (no intervals).\n")
    grid = paper_grid(rows)
    return text + ("\n" + grid if grid else "")


def paper_grid(rows: list[Row]) -> str:
    """The layout of the paper's table, per training dataset: one line per (shots, arch), one
    column per method, "ours (paper)" in each cell (5-way, in-domain, unlabelled variants only)."""
    grids = []
    for dataset in sorted({r.train_dataset for r in rows}):
        cells = {(r.shots, r.arch, r.method): r for r in rows if r.train_dataset == dataset
                 and not r.cross_domain and not r.variant and r.ways == 5}
        if not cells:
            continue
        methods = [m for m in METHOD_LABELS if any(k[2] == m for k in cells)]
        methods += sorted({k[2] for k in cells} - set(methods))
        settings = sorted({(k[0], k[1]) for k in cells}, key=lambda s: (s[1] != "conv4", s[1], -s[0]))
        lines = [f"In the paper's layout (trained and tested on {dataset}; ours (paper)):", "",
                 "| setting | " + " | ".join(label(m) for m in methods) + " |",
                 "|---|" + "---|" * len(methods)]
        for shots, arch in settings:
            out = []
            for m in methods:
                r = cells.get((shots, arch, m))
                paper = "" if r is None else f" ({'–' if r.paper is None else f'{r.paper:.2f}'})"
                out.append("" if r is None else r.result_text() + paper)
            lines.append(f"| {shots}-shot, {ARCH_LABELS.get(arch, arch)} | " + " | ".join(out) + " |")
        grids.append("\n".join(lines) + "\n")
    return "\n".join(grids)


CSV_FIELDS = ["method", "arch", "ways", "shots", "train_dataset", "dataset", "cross_domain",
              "variant", "accuracy", "ci95", "std", "num_seeds", "num_tasks", "paper", "runs"]


def write_csv(rows: list[Row], path: Path) -> None:
    """One line per row; accuracy, ci95 (one seed) and std (several seeds) in %."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            single = len(r.accuracies) == 1
            writer.writerow({
                "method": r.method, "arch": r.arch, "ways": r.ways, "shots": r.shots,
                "train_dataset": r.train_dataset, "dataset": r.dataset,
                "cross_domain": r.cross_domain, "variant": r.variant,
                "accuracy": f"{r.mean:.4f}", "ci95": f"{r.ci95[0]:.4f}" if single else "",
                "std": "" if single else f"{r.spread:.4f}", "num_seeds": len(r.accuracies),
                "num_tasks": ";".join(map(str, r.num_tasks)),
                "paper": "" if r.paper is None else f"{r.paper:.2f}", "runs": ";".join(r.runs),
            })


def default_out(runs: list[Run]) -> Path:
    """The common parent folder of the run folders."""
    return Path(os.path.commonpath([str(r.path.resolve().parent) for r in runs]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, or folders that hold run folders")
    parser.add_argument("--out", help="folder for results.md and results.csv "
                                      "(default: the common parent of the run folders)")
    parser.add_argument("--paper", default=str(PAPER_FILE), help="the paper's numbers (YAML)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = build_rows(runs, load_paper(Path(args.paper)))
    untested = [str(r.path) for r in runs if not r.test_results()]
    if untested:
        print(f"note: {len(untested)} run(s) without a test result left out: {', '.join(untested)}",
              file=sys.stderr)
    if not rows:
        print("error: none of the runs has a test result yet", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else default_out(runs)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows)
    (out / "results.md").write_text(text)
    write_csv(rows, out / "results.csv")
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
