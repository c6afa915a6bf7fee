"""Summarise run folders as the paper's results table, with intervals, beside the paper's numbers.

    python utils/collect_results.py runs/                       # every run folder under runs/
    python utils/collect_results.py runs/a runs/b --out results/

Cells come from each run's config.yaml (method from inner.*, model.arch, data.num_shots), never
from its folder name. Runs that differ only in run.* and housekeeping keys are seeds of one cell:
one seed gives "mean ± 95% CI" over its test tasks, several "mean ± std over seeds (n=K)". Runs
that differ in anything else (a sweep) stay separate rows, labelled by the keys that differ; test
records on another dataset than the training one become cross-domain rows. Published numbers
(configs/paper_results.yaml) appear only beside runs of the run.protocol that produced them.
Writes results.md and results.csv into --out (default: the common parent folder of the runs) and
prints the table. Which test record counts (the same rule in utils/plot_sparsity.py): see
docs/reproducing.md, "The results table"; every record left out, and every row that pools runs as
seeds, is reported on stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from sparse_maml.config import parse_yaml
from sparse_maml.results import (ARCH_LABELS, METHOD_LABELS, Run, default_out, find_runs, label,
                                 report_left_out, warn)

PAPER_FILE = Path(__file__).resolve().parents[1] / "configs" / "paper_results.yaml"
PAPER_DATASET = "miniimagenet"  # the dataset of every number in PAPER_FILE
# The first line of every results.md this script writes: a results.md (and results.csv beside it)
# without it is someone's own file, and is never written over.
MARK = "<!-- written by utils/collect_results.py -->"


@dataclass(frozen=True)
class Published:
    """One published number: its value, where it comes from and the protocol that produced it."""

    value: float
    protocol: str
    source: str
    earlier: Published | None = None  # an earlier published version of the same number


def load_paper(path: Path) -> tuple[dict[tuple[str, str, int], Published], dict[str, str]]:
    """(method, arch, shots) -> the published number (MiniImageNet, 5-way, %), and protocol
    label -> its readable name (`protocols`)."""
    tree = parse_yaml(path.read_text(encoding="utf-8"))
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
    return found, {k: v["name"] for k, v in (tree.get("protocols") or {}).items()}


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
    runs: list[str]
    protocol: str
    published: Published | None  # the cell's published number, whatever its protocol

    @property
    def cross_domain(self) -> bool:
        return self.dataset != self.train_dataset

    @property
    def paper(self) -> float | None:
        """The published number if this row reproduces it (same protocol, in-domain, MiniImageNet
        5-way)."""
        p = self.published
        same = p is not None and p.protocol == self.protocol and not self.cross_domain
        return p.value if same and self.train_dataset == PAPER_DATASET and self.ways == 5 else None

    def paper_text(self) -> str:
        """The paper column: the number, or why there is none."""
        p = self.published
        if p is None or self.cross_domain:
            return "–"
        if p.protocol != self.protocol:
            return f"none under this protocol ({p.value:.2f} is {p.protocol}'s)"
        if self.paper is None:  # e.g. a debug run on synthetic data
            return f"not comparable: {p.value:.2f} is miniimagenet 5-way"
        return f"{p.value:.2f}" + (f" (first README: {p.earlier.value:.2f})" if p.earlier else "")

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def spread(self) -> float:
        """95% CI over test tasks (one seed) or std over seeds (several)."""
        return self.ci95[0] if len(self.accuracies) == 1 else statistics.stdev(self.accuracies)

    def result_text(self) -> str:
        text = f"{self.mean:.2f} ± {self.spread:.2f}"
        return text if len(self.accuracies) == 1 else f"{text} (std, n={len(self.accuracies)})"


def build_rows(runs: list[Run], paper: dict[tuple[str, str, int], Published]) -> list[Row]:
    """Group runs into cells and variants; one row per (variant, test dataset)."""
    groups: dict[tuple, dict[tuple, list[Run]]] = {}
    for run in runs:
        if run.test_results():
            groups.setdefault(run.cell, {}).setdefault(run.fingerprint(), []).append(run)
    rows = []
    for (method, arch, ways, shots, train_dataset, protocol), variants in groups.items():
        labels = variant_labels(variants)
        for fingerprint, members in variants.items():
            seeds = [run.cfg["run.seed"] for run in members]
            paths = ", ".join(str(r.path) for r in members)
            if len(set(seeds)) < len(seeds):
                warn("runs with the same config and run.seed are counted as separate seeds: "
                     + paths)
            elif len(members) > 1:
                warn(f"{len(members)} runs pooled as seeds {sorted(seeds)} of one row "
                     f"({label(method)} {arch} {shots}-shot, {protocol}): {paths}")
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


COLUMNS = ["method", "arch", "shots", "protocol", "trained on", "tested on", "variant",
           "accuracy (%)", "paper (%)", "seeds", "test tasks"]


def markdown(rows: list[Row], protocols: dict[str, str]) -> str:
    """The full table, then the paper-style grids (settings x methods) of the in-domain cells; the
    published numbers (MiniImageNet's) only when some run was trained on MiniImageNet."""
    with_paper = any(r.train_dataset == PAPER_DATASET for r in rows)
    columns = [c for c in COLUMNS if with_paper or c != "paper (%)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        tested = r.dataset + (" (cross-domain)" if r.cross_domain else "")
        lines.append("| " + " | ".join([
            label(r.method), ARCH_LABELS.get(r.arch, r.arch), f"{r.ways}-way {r.shots}-shot",
            r.protocol, r.train_dataset, tested, r.variant, r.result_text(),
            *([r.paper_text()] if with_paper else []),
            str(len(r.accuracies)), "/".join(sorted({str(n) for n in r.num_tasks})),
        ]) + " |")
    text = "\n".join(lines) + "\n\n" + (
        "Accuracy: mean ± 95% confidence interval over the test tasks (one seed), or mean ± standard "
        "deviation over seeds (n seeds).")
    text += (" Paper: the published number (configs/paper_results.yaml, MiniImageNet, no "
             "intervals), shown only beside runs of the protocol that produced it; \"none under this "
             "protocol\" marks a same-protocol run with no published number.\n" if with_paper else
             " No run was trained on MiniImageNet, so no published number is shown.\n")
    used = sorted({r.protocol for r in rows} & set(protocols))
    if used:
        text += "Protocols: " + "; ".join(f"{p} = {protocols[p]}" for p in used) + ".\n"
    if not with_paper:
        return text
    grids = [paper_grid(rows, "as published (each number under its own protocol)",
                        lambda r: r.paper is not None),
             paper_grid(rows, "all methods under the reference's protocol",
                        lambda r: r.protocol == "reference")]
    return text + "".join("\n" + g for g in grids if g)


def paper_grid(rows: list[Row], title: str, keep) -> str:
    """The paper's table per training dataset: a line per (shots, arch), a column per method,
    "ours (paper)" in each cell (5-way, in-domain, unlabelled variants, rows where keep(row))."""
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
            found = [cells.get((shots, arch, m)) for m in methods]
            out = ["" if r is None else f"{r.result_text()} ("
                   + ("–" if r.paper is None else f"{r.paper:.2f}") + ")" for r in found]
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
                **{k: getattr(r, k) for k in CSV_FIELDS[:CSV_FIELDS.index("accuracy")]},
                "accuracy": f"{r.mean:.4f}", "ci95": f"{r.ci95[0]:.4f}" if single else "",
                "std": "" if single else f"{r.spread:.4f}", "num_seeds": len(r.accuracies),
                "num_tasks": ";".join(map(str, r.num_tasks)),
                "paper": "" if r.paper is None else f"{r.paper:.2f}",
                "paper_note": "" if r.paper is not None else r.paper_text().replace("–", ""),
                "runs": ";".join(r.runs)})


def check_ours(out: Path) -> None:
    """Refuse (FileExistsError) to replace a results.md or results.csv in `out` that this script
    did not write (a results.md without MARK, or a results.csv without such a results.md)."""
    md = out / "results.md"
    ours = md.is_file() and md.read_text(encoding="utf-8", errors="replace").startswith(MARK)
    for path in (md, out / "results.csv"):
        if path.exists() and not ours:
            raise FileExistsError(f"{path} exists and was not written by collect_results.py: it is "
                                  "left as it is; choose another folder with --out")


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
        paper, protocols = load_paper(Path(args.paper))
    except (OSError, ValueError, yaml.YAMLError) as err:
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
    text = markdown(rows, protocols)
    try:
        out.mkdir(parents=True, exist_ok=True)
        check_ours(out)
        (out / "results.md").write_text(f"{MARK}\n\n{text}")
        write_csv(rows, out / "results.csv")
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
