"""Paper-style figures from run folders (metrics.jsonl + config.yaml), written as PNG.

    python utils/plot_sparsity.py runs/sparse_maml_conv4_5shot          # figures of one run
    python utils/plot_sparsity.py runs/a runs/b --out figures/
    python utils/plot_sparsity.py --sweep runs/*-step_size-* --key inner.step_size

Per run (into the run folder, or --out):
- sparsity_over_training.png: mask sparsity of every masked parameter tensor per epoch (one line
  per tensor, input side dark to output side light), with the mean over all masked entries;
- sparsity_final.png: sparsity per tensor of the tested (best-validation) masks, as bars;
- accuracy.png: meta-training query accuracy per epoch, validation accuracy with its 95% interval,
  and the test accuracy of the best checkpoint.
Runs without a mask (MAML, ANIL, BOIL) get accuracy.png only.

--sweep: test accuracy against a config key (inner.step_size, inner.steps, ...) for runs that
differ in that key, one line per method/architecture/shots, mean ± 95% CI (one seed) or ± std
over seeds: the paper's claim that sparse-MAML is robust to the inner step size and step count.
Written as sweep_<key>.png into --out (default: the common parent folder of the runs).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect_results import (ARCH_LABELS, Run, default_out, find_runs, label,  # noqa: E402
                             method_of)


def run_title(run: Run) -> str:
    c = run.cfg
    return (f"{label(method_of(c))}, {ARCH_LABELS.get(c['model.arch'], c['model.arch'])}, "
            f"{c['data.name']} {c['data.num_ways']}-way {c['data.num_shots']}-shot")


def records(run: Run, kind: str) -> list[dict]:
    return [r for r in run.records if r.get("kind") == kind]


def final_sparsity(run: Run) -> dict[str, float]:
    """Per-tensor sparsity of the tested checkpoint, else of the last training epoch."""
    for record in reversed(records(run, "test")):
        if record.get("sparsity"):
            return {k: v for k, v in record["sparsity"].items() if k != "mean"}
    train = [r for r in records(run, "train") if r.get("layer_sparsity")]
    return dict(train[-1]["layer_sparsity"]) if train else {}


def plot_sparsity_over_training(run: Run, path: Path) -> bool:
    """One line per masked tensor: its sparsity after each epoch. False if the run has no mask."""
    train = [r for r in records(run, "train") if r.get("layer_sparsity")]
    if not train:
        return False
    names = list(train[-1]["layer_sparsity"])
    epochs = [r["epoch"] for r in train]
    colours = plt.cm.viridis([i / max(1, len(names) - 1) for i in range(len(names))])
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, colour in zip(names, colours):
        values = [100 * r["layer_sparsity"].get(name, math.nan) for r in train]
        ax.plot(epochs, values, color=colour, lw=1.2, marker="." if len(epochs) < 30 else None,
                label=name)
    ax.plot(epochs, [100 * r.get("mask_sparsity", math.nan) for r in train], color="black",
            lw=2.2, ls="--", label="all masked weights")
    ax.set(xlabel="epoch", ylabel="gradient sparsity (% of entries that do not adapt)",
           title=f"Mask sparsity per layer during meta-training\n{run_title(run)}", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              ncol=1 if len(names) <= 24 else 2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_final_sparsity(run: Run, path: Path) -> bool:
    """Bars: sparsity per masked tensor, input side first. False if the run has no mask."""
    sparsity = final_sparsity(run)
    if not sparsity:
        return False
    names = list(sparsity)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4.5))
    colours = plt.cm.viridis([i / max(1, len(names) - 1) for i in range(len(names))])
    ax.bar(range(len(names)), [100 * sparsity[n] for n in names], color=colours)
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set(ylabel="gradient sparsity (%)", ylim=(0, 100),
           title=f"Final mask sparsity per layer\n{run_title(run)}")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_accuracy(run: Run, path: Path) -> bool:
    """Training and validation accuracy per epoch, and the test accuracy."""
    train, val, test = records(run, "train"), records(run, "val"), records(run, "test")
    if not (train or val):
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot([r["epoch"] for r in train], [100 * r["accuracy"] for r in train],
                label="meta-training (query, after adaptation)", color="tab:blue", lw=1.2,
                marker="." if len(train) < 30 else None)
    if val:
        x = [r["epoch"] for r in val]
        y = [100 * r["accuracy"] for r in val]
        ci = [100 * r.get("ci95", 0.0) for r in val]
        ax.plot(x, y, label="validation (95% CI band)", color="tab:orange", marker="o", ms=3)
        ax.fill_between(x, [a - c for a, c in zip(y, ci)], [a + c for a, c in zip(y, ci)],
                        color="tab:orange", alpha=0.2)
        best = [r for r in val if r.get("best")]
        if best:
            ax.axvline(best[-1]["epoch"], color="tab:orange", ls=":", lw=1,
                       label=f"best validation (epoch {best[-1]['epoch']})")
    own = [r for r in test if r.get("dataset", run.cfg["data.name"]) == run.cfg["data.name"]
           and r.get("split", "test") == "test"]
    if own:
        r = own[-1]
        epoch = r.get("epoch") or (val[-1]["epoch"] if val else train[-1]["epoch"])
        ax.errorbar([epoch], [100 * r["accuracy"]], yerr=[100 * r.get("ci95", 0.0)], fmt="s",
                    color="tab:green", capsize=4,
                    label=f"test {100 * r['accuracy']:.2f} ± {100 * r.get('ci95', 0.0):.2f}")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"Accuracy\n{run_title(run)}",
           ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_run(run: Run, out: Path) -> list[Path]:
    """All per-run figures of one run into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in (("sparsity_over_training.png", plot_sparsity_over_training),
                     ("sparsity_final.png", plot_final_sparsity), ("accuracy.png", plot_accuracy)):
        if fn(run, out / name):
            written.append(out / name)
    return written


def sweep_points(runs: list[Run], key: str) -> dict[str, dict[float, list[tuple[float, float]]]]:
    """Series label -> key value -> [(test accuracy %, ci95 %) per seed]."""
    series: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for run in runs:
        if key not in run.cfg:
            raise KeyError(f"{run.path}: config has no key {key!r}")
        result = run.test_results().get(run.cfg["data.name"])
        if result is None:
            print(f"note: {run.path} has no test result; left out", file=sys.stderr)
            continue
        c = run.cfg
        name = (f"{label(method_of(c))}, {ARCH_LABELS.get(c['model.arch'], c['model.arch'])}, "
                f"{c['data.num_shots']}-shot")
        point = (100 * result["accuracy"], 100 * result.get("ci95", 0.0))
        series.setdefault(name, {}).setdefault(float(c[key]), []).append(point)
    return series


def plot_sweep(runs: list[Run], key: str, path: Path) -> None:
    """Test accuracy against the swept key, one line per method/arch/shots."""
    series = sweep_points(runs, key)
    if not series:
        raise ValueError("no run of the sweep has a test result")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, points in sorted(series.items()):
        xs = sorted(points)
        ys, errs = [], []
        for x in xs:
            accs = [a for a, _ in points[x]]
            ys.append(statistics.fmean(accs))
            errs.append(points[x][0][1] if len(accs) == 1 else statistics.stdev(accs))
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name)
    values = sorted({x for p in series.values() for x in p})
    if len(values) > 2 and values[0] > 0 and values[-1] / values[0] >= 10:
        ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()  # log-scale minor labels would overprint the swept values
    ax.set(xlabel=key, ylabel="test accuracy (%)", ylim=(0, 100),
           title=f"Test accuracy against {key}\n(bars: 95% CI over tasks, or std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (or folders holding run folders)")
    parser.add_argument("--out", help="output folder (default: each run's folder; for --sweep the "
                                      "common parent of the runs)")
    parser.add_argument("--sweep", action="store_true",
                        help="one figure of test accuracy against --key over all the runs")
    parser.add_argument("--key", default="inner.step_size",
                        help="config key of the sweep (default inner.step_size)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.sweep:
        out = Path(args.out) if args.out else default_out(runs)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"sweep_{args.key.replace('.', '_')}.png"
        try:
            plot_sweep(runs, args.key, path)
        except (KeyError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
        return 0
    for run in runs:
        out = Path(args.out) / run.path.name if args.out and len(runs) > 1 else (
            Path(args.out) if args.out else run.path)
        for path in plot_run(run, out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
