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

Published numbers (configs/paper_results.yaml) appear only beside runs whose run.protocol is the
protocol that produced the number; a baseline run under another protocol is shown as a
same-protocol run with no published number.

Which test record counts (the same rule in utils/plot_sparsity.py): per run and test dataset, the
test-split records made either by train.py or by test.py with overrides that leave the experiment
unchanged (the data location, the number of test tasks, the evaluation batch size, or a key set to
the value it already has); of those, the one with the most test tasks, the latest on a tie. Every
record left out, and every row that pools several runs as seeds, is reported on stderr.
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
from typing import Any, Optional

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
                "data.on_device", "outer.implementation", "outer.compile_mode",
                "outer.checkpoint_inner_steps", "train.eval_batch_size",
                "train.test_after_training", "outer.max_bad_steps")
# Test-time overrides (test.py) that keep a record comparable: where the data lives, how many test
# tasks are drawn and how many are adapted together.
SAME_EXPERIMENT = ("data.name", "data.root", "data.layout", "data.download", "data.num_workers",
                   "data.on_device", "train.eval_batch_size", "train.num_test_tasks", "run.")
PROTOCOL_NONE = "(none)"  # the label of runs whose run.protocol is empty


DEFAULTS = flatten(to_dict(Config()))


def warn(message: str) -> None:
    """Tell the user on stderr (these are scripts: what is left out or pooled is never silent)."""
    print(f"warning: {message}", file=sys.stderr)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A half-written last line (a run still writing, or killed
    mid-write) is skipped with a warning naming the file; a broken line elsewhere is an error."""
    with open(path) as f:
        lines = f.read().split("\n")
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if position == len(numbered) - 1:
                warn(f"{path}: line {number} is incomplete (the run may still be writing it, or was "
                     f"stopped mid-write); skipped: {line[:60]!r}")
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}); the file is "
                             "damaged: repair or remove that line") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def _yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def changed_keys(record: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The overrides of a test.py record that change the experiment: keys outside SAME_EXPERIMENT
    whose value differs from the run's config (an override equal to the config changes nothing)."""
    changed = []
    for item in record.get("overrides") or []:
        key, _, raw = item.partition("=")
        if key.startswith(SAME_EXPERIMENT):
            continue
        value = _yaml_value(raw)
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
                            if not k.startswith(HOUSEKEEPING)))

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
        candidates = [p] if (p / "config.yaml").is_file() else sorted(
            c.parent for c in p.rglob("config.yaml"))
        folders += [c for c in candidates if (c / "metrics.jsonl").is_file() and c not in folders]
    if not folders:
        raise FileNotFoundError(f"no run folder (config.yaml + metrics.jsonl) under {' '.join(paths)}")
    runs = []
    for folder in folders:
        with open(folder / "config.yaml") as f:
            cfg = {**DEFAULTS, **flatten(yaml.safe_load(f) or {})}
        runs.append(Run(folder, cfg, read_records(folder / "metrics.jsonl")))
    return runs


@dataclass(frozen=True)
class Published:
    """One published number: its value, where it comes from and the protocol that produced it."""

    value: float
    protocol: str
    source: str
    earlier: Optional["Published"] = None  # an earlier published version of the same number


def load_paper(path: Path = PAPER_FILE) -> dict[tuple[str, str, int], Published]:
    """(method, arch, shots) -> the published number (MiniImageNet, 5-way, %)."""
    with open(path) as f:
        tree = yaml.safe_load(f)
    found = {}
    for method, archs in tree["accuracy"].items():
        for arch, shots in archs.items():
            for k, entry in shots.items():
                if entry is None:
                    continue
                try:
                    earlier = entry.get("earlier")
                    found[(method, arch, int(k))] = Published(
                        float(entry["value"]), entry["protocol"], entry["source"],
                        Published(float(earlier["value"]), entry["protocol"], earlier["source"])
                        if earlier else None)
                except (AttributeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}: accuracy.{method}.{arch}.{k} needs value, protocol and "
                                     f"source, got {entry!r}") from err
    return found


def load_protocol_names(path: Path = PAPER_FILE) -> dict[str, str]:
    """Protocol label -> its readable name (configs/paper_results.yaml, `protocols`)."""
    with open(path) as f:
        tree = yaml.safe_load(f)
    return {k: v["name"] for k, v in (tree.get("protocols") or {}).items()}


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
    protocol: str = PROTOCOL_NONE
    published: Published | None = None  # the cell's published number, whatever its protocol

    @property
    def paper(self) -> float | None:
        """The published number, only where this row reproduces it: same protocol, MiniImageNet
        5-way, tested on the training dataset."""
        p = self.published
        if p is None or p.protocol != self.protocol or self.cross_domain:
            return None
        return p.value if self.train_dataset == "miniimagenet" and self.ways == 5 else None

    def paper_text(self) -> str:
        """The paper column: the number, or why there is none."""
        p = self.published
        if p is None or self.cross_domain:
            return "–"
        if p.protocol != self.protocol:
            return f"none under this protocol ({p.value:.2f} is {p.protocol}'s)"
        earlier = f" (first README: {p.earlier.value:.2f})" if p.earlier else ""
        if self.paper is None:  # e.g. a debug run on synthetic data
            return f"not comparable: {p.value:.2f} is miniimagenet 5-way"
        return f"{p.value:.2f}{earlier}"

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


def build_rows(runs: list[Run], paper: dict[tuple[str, str, int], Published]) -> list[Row]:
    """Group runs into cells and variants; one row per (variant, test dataset)."""
    groups: dict[tuple, dict[tuple, list[Run]]] = {}
    for run in runs:
        if run.test_results():
            groups.setdefault(run.cell, {}).setdefault(run.fingerprint(), []).append(run)
    rows = []
    for cell, variants in groups.items():
        method, arch, ways, shots, train_dataset, protocol = cell
        labels = variant_labels(variants)
        for fingerprint, members in variants.items():
            seeds = [run.cfg["run.seed"] for run in members]
            if len(set(seeds)) < len(seeds):
                warn(f"runs with the same config and run.seed are counted as separate "
                     f"seeds: {', '.join(str(r.path) for r in members)}")
            elif len(members) > 1:
                warn(f"{len(members)} runs pooled as seeds {sorted(seeds)} of one row "
                     f"({label(method)} {arch} {shots}-shot, {protocol}): "
                     f"{', '.join(str(r.path) for r in members)}")
            per_dataset: dict[str, list[tuple[Run, dict]]] = {}
            for run in members:
                for dataset, record in run.test_results().items():
                    per_dataset.setdefault(dataset, []).append((run, record))
            for dataset, pairs in per_dataset.items():
                rows.append(Row(
                    method, arch, ways, shots, train_dataset, dataset, labels[fingerprint],
                    accuracies=[100 * r["accuracy"] for _, r in pairs],
                    ci95=[100 * r.get("ci95", math.nan) for _, r in pairs],
                    num_tasks=[int(r.get("num_tasks", 0)) for _, r in pairs],
                    runs=[str(run.path) for run, _ in pairs], protocol=protocol,
                    published=paper.get((method, arch, shots))))
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
            row.dataset, method_rank, row.method, row.protocol != "reference", row.protocol,
            row.variant)


def label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


COLUMNS = ["method", "arch", "shots", "protocol", "trained on", "tested on", "variant",
           "accuracy (%)", "paper (%)", "seeds", "test tasks"]


def markdown(rows: list[Row], protocols: dict[str, str] | None = None) -> str:
    """The full table, then the paper-style grids (settings x methods) of the in-domain cells."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        tested = r.dataset + (" (cross-domain)" if r.cross_domain else "")
        lines.append("| " + " | ".join([
            label(r.method), ARCH_LABELS.get(r.arch, r.arch), f"{r.ways}-way {r.shots}-shot",
            r.protocol, r.train_dataset, tested, r.variant or "", r.result_text(), r.paper_text(),
            str(len(r.accuracies)), "/".join(sorted({str(n) for n in r.num_tasks})),
        ]) + " |")
    used = sorted({r.protocol for r in rows} & set(protocols or {}))
    text = "\n".join(lines) + "\n\n" + (
        "Accuracy: mean ± 95% confidence interval over the test tasks (one seed), or mean ± standard "
        "deviation over seeds (n seeds). Paper: the published number (configs/paper_results.yaml, "
        "no intervals), shown only beside runs of the protocol that produced it; \"none under this "
        "protocol\" marks a same-protocol run with no published number.\n")
    if used:
        text += "Protocols: " + "; ".join(f"{p} = {protocols[p]}" for p in used) + ".\n"
    grids = [paper_grid(rows, "as published (each number under its own protocol)",
                        lambda r: r.paper is not None),
             paper_grid(rows, "all methods under the reference's protocol",
                        lambda r: r.protocol == "reference")]
    return text + "".join("\n" + g for g in grids if g)


def paper_grid(rows: list[Row], title: str, keep) -> str:
    """The layout of the paper's table, per training dataset: one line per (shots, arch), one
    column per method, "ours (paper)" in each cell (5-way, in-domain, unlabelled variants, rows
    for which keep(row) holds)."""
    grids = []
    for dataset in sorted({r.train_dataset for r in rows}):
        cells = {(r.shots, r.arch, r.method): r for r in rows if r.train_dataset == dataset
                 and not r.cross_domain and not r.variant and r.ways == 5 and keep(r)}
        if not cells:
            continue
        methods = [m for m in METHOD_LABELS if any(k[2] == m for k in cells)]
        methods += sorted({k[2] for k in cells} - set(methods))
        settings = sorted({(k[0], k[1]) for k in cells}, key=lambda s: (s[1] != "conv4", s[1], -s[0]))
        lines = [f"In the paper's layout, {title} (trained and tested on {dataset}; ours (paper)):",
                 "", "| setting | " + " | ".join(label(m) for m in methods) + " |",
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


CSV_FIELDS = ["method", "arch", "ways", "shots", "protocol", "train_dataset", "dataset",
              "cross_domain", "variant", "accuracy", "ci95", "std", "num_seeds", "num_tasks", "paper",
              "paper_note", "runs"]


def write_csv(rows: list[Row], path: Path) -> None:
    """One line per row; accuracy, ci95 (one seed) and std (several seeds) in %."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            single = len(r.accuracies) == 1
            writer.writerow({
                "method": r.method, "arch": r.arch, "ways": r.ways, "shots": r.shots,
                "protocol": r.protocol,
                "train_dataset": r.train_dataset, "dataset": r.dataset,
                "cross_domain": r.cross_domain, "variant": r.variant,
                "accuracy": f"{r.mean:.4f}", "ci95": f"{r.ci95[0]:.4f}" if single else "",
                "std": "" if single else f"{r.spread:.4f}", "num_seeds": len(r.accuracies),
                "num_tasks": ";".join(map(str, r.num_tasks)),
                "paper": "" if r.paper is None else f"{r.paper:.2f}",
                "paper_note": "" if r.paper is not None else r.paper_text().replace("–", ""),
                "runs": ";".join(r.runs),
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
        paper = load_paper(Path(args.paper))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report_left_out(runs)
    rows = build_rows(runs, paper)
    untested = [str(r.path) for r in runs if not r.test_results()]
    if untested:
        print(f"note: {len(untested)} run(s) without a test result left out: {', '.join(untested)}",
              file=sys.stderr)
    if not rows:
        print("error: none of the runs has a test result yet", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else default_out(runs)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, load_protocol_names(Path(args.paper)))
    (out / "results.md").write_text(text)
    write_csv(rows, out / "results.csv")
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
