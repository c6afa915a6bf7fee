"""Paper-style figures from run folders (metrics.jsonl + config.yaml), as PNG and PDF.

    python utils/plot_sparsity.py runs/sparse_maml_conv4_5shot          # figures of one run
    python utils/plot_sparsity.py runs/a runs/b --out figures/ --format png,svg
    python utils/plot_sparsity.py runs/x --layers all                   # every masked tensor
    python utils/plot_sparsity.py --sweep runs/robustness --key inner.step_size   # runs below it

Per run (into the run folder, or --out), in every --format: sparsity_over_training (mask sparsity
per epoch, per --layers line and over all masked entries), sparsity_final (per tensor, of the
tested masks) and accuracy (training, validation with its 95% interval, and the test record that
utils/collect_results.py counts). Runs without a mask (MAML, ANIL, BOIL) get accuracy only.

--sweep: test accuracy against a config key, one line per method/architecture/shots/protocol and
per setting of any other key that differs (named in the legend, never merged), with 95% intervals
over the test tasks (one seed) or over the seeds (Student t); written as sweep_<key>.<format> into
--out (default: the common parent folder of the runs). Details: docs/reproducing.md, "Figures" and
"The robustness claim".
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import ScaledTranslation
from scipy import stats

from sparse_maml.config import SEED_POOLED, is_custom_arch
from sparse_maml.models import build_model, conv_weight_names
from sparse_maml.results import (ARCH_LABELS, PROTOCOL_NONE, Run, default_out, find_runs, label,
                                 method_of, report_left_out, warn)

plt.switch_backend("Agg")  # files only, never a window

FORMATS = ("png", "pdf", "svg")
MAX_LINES = 8  # more conv weights than this are drawn per block
# Distinguishable in colour, dash pattern and marker, and in greyscale print.
COLOURS = plt.cm.tab10.colors
DASHES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def line_style(i: int, sweep: bool = False) -> dict:
    """Line i: no two of the first 40 look alike; a sweep's change dash and marker every line (in
    greyscale the first four differ by dash, the first eight by marker), every other one hollow."""
    dash = DASHES[(i if sweep else i // len(COLOURS)) % len(DASHES)]
    style = {"color": COLOURS[i % len(COLOURS)], "ls": dash, "marker": MARKERS[i % len(MARKERS)]}
    return {**style, "mfc": "white" if i % 2 else None} if sweep else style


def save(fig, stem: Path, formats: tuple[str, ...]) -> list[Path]:
    """Write the figure once per format (PNG at 150 dpi; PDF and SVG are vector)."""
    paths = [stem.with_suffix(f".{fmt}") for fmt in formats]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def tensor_sizes(run: Run) -> dict[str, tuple[int, bool]]:
    """Parameter name -> (entries, is a conv weight) of the model the config builds, on the meta
    device; {} for a backbone of your own (building it would import the code the run names)."""
    c = run.cfg
    if is_custom_arch(c["model.arch"]):
        return {}
    with torch.device("meta"):
        model = build_model(c["model.arch"], 3, c["data.num_ways"], 84, tuple(c["model.widths"]))
    conv = set(conv_weight_names(model))
    return {n: (p.numel(), n in conv) for n, p in model.named_parameters()}


def block_of(name: str) -> str:
    """The group a tensor is drawn in with --layers blocks: body.blockK, or the head."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "body" else parts[0]


def sparsity_series(run: Run, train: list[dict], view: str) -> dict[str, list[float]]:
    """Line label -> sparsity (%) per epoch, for the chosen --layers view."""
    names = list(train[-1]["layer_sparsity"])
    sizes = tensor_sizes(run)
    unknown = [n for n in names if n not in sizes]
    if unknown and sizes:  # a config that no longer builds the logged model: show what was logged
        warn(f"{run.path}: masked tensors {', '.join(unknown)} are not in the model its config "
             "builds; drawing every logged tensor")
    conv = [n for n in names if n in sizes and sizes[n][1]]
    if unknown:
        view = "all"
    elif view == "conv" and (len(conv) > MAX_LINES or not conv):
        view = "blocks"
    if view == "blocks":  # conv weights of each block, entry-weighted, and the head's weight
        groups = {}
        for n in names:
            if sizes[n][1] or (n.startswith("head.") and n.endswith("weight")):
                groups.setdefault(block_of(n), []).append(n)
    else:
        groups = {n: [n] for n in (names if view == "all" else conv)}
    series = {}
    for group, members in groups.items():
        weights = [sizes[n][0] if n in sizes else 1 for n in members]
        label_text = group if len(members) == 1 else f"{group} ({len(members)} conv weights)"
        series[label_text] = [
            100 * sum(layer[n] * w for n, w in zip(members, weights)) / sum(weights)
            if all(n in layer for n in members) else math.nan
            for layer in (record["layer_sparsity"] for record in train)]
    return series


def run_title(run: Run) -> str:
    c = run.cfg
    return (f"{label(method_of(c))}, {ARCH_LABELS.get(c['model.arch'], c['model.arch'])}, "
            f"{c['data.name']} {c['data.num_ways']}-way {c['data.num_shots']}-shot")


def records(run: Run, kind: str) -> list[dict]:
    return [r for r in run.records if r.get("kind") == kind]


def plot_sparsity_over_training(run: Run, stem: Path, formats: tuple[str, ...],
                                view: str) -> list[Path]:
    """Sparsity per epoch of the chosen tensors and of all masked entries. [] if no mask."""
    train = [r for r in records(run, "train") if r.get("layer_sparsity")]
    if not train:
        return []
    epochs = [r["epoch"] for r in train]
    series = sparsity_series(run, train, view)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, values) in enumerate(series.items()):
        style = line_style(i)
        if len(epochs) > 30:
            style["marker"] = None
        ax.plot(epochs, values, lw=1.6, ms=4, markevery=max(1, len(epochs) // 15), label=name,
                **style)
    ax.plot(epochs, [100 * r.get("mask_sparsity", math.nan) for r in train], color="black",
            lw=2.6, label="all masked entries")
    ax.set(xlabel="epoch", ylabel="gradient sparsity (% of entries that do not adapt)",
           title=f"Mask sparsity during meta-training\n{run_title(run)}", ylim=(0, 100))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5),
              ncol=1 if len(series) <= 20 else 2)
    return save(fig, stem, formats)


def plot_final_sparsity(run: Run, stem: Path, formats: tuple[str, ...]) -> list[Path]:
    """Bars: sparsity per masked tensor of the tested checkpoint (else of the last training
    epoch), input side first, one colour per block. [] if no mask."""
    tested = [r["sparsity"] for r in records(run, "test") if r.get("sparsity")]
    train = [r for r in records(run, "train") if r.get("layer_sparsity")]
    sparsity = ({k: v for k, v in tested[-1].items() if k != "mean"} if tested
                else dict(train[-1]["layer_sparsity"]) if train else {})
    if not sparsity:
        return []
    names = list(sparsity)
    blocks = list(dict.fromkeys(block_of(n) for n in names))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4.5))
    colours = [COLOURS[blocks.index(block_of(n)) % len(COLOURS)] for n in names]
    ax.bar(range(len(names)), [100 * sparsity[n] for n in names], color=colours)
    ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
    ax.set(ylabel="gradient sparsity (%)", ylim=(0, 100),
           title=f"Final mask sparsity per layer\n{run_title(run)}")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, stem, formats)


def fitted_limits(values: list[float]) -> tuple[float, float]:
    """An accuracy axis around the data (within 0-100), with a margin."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 100.0
    low, high = min(finite), max(finite)
    margin = max(1.0, 0.08 * (high - low))
    return max(0.0, low - margin), min(100.0, high + margin)


def plot_accuracy(run: Run, stem: Path, formats: tuple[str, ...]) -> list[Path]:
    """Training and validation accuracy per epoch, and the test accuracy."""
    train, val = records(run, "train"), records(run, "val")
    if not (train or val):
        return []
    shown: list[float] = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ys = [100 * r["accuracy"] for r in train]
        shown += ys
        ax.plot([r["epoch"] for r in train], ys,
                label="meta-training (query, after adaptation)", color="tab:blue", lw=1.2,
                marker="." if len(train) < 30 else None)
    if val:
        x = [r["epoch"] for r in val]
        y = [100 * r["accuracy"] for r in val]
        ci = [100 * r.get("ci95", 0.0) for r in val]
        low, high = [a - c for a, c in zip(y, ci)], [a + c for a, c in zip(y, ci)]
        shown += low + high
        ax.plot(x, y, label="validation (95% CI band)", color="tab:orange", marker="o", ms=3)
        ax.fill_between(x, low, high, color="tab:orange", alpha=0.2)
        best = [r for r in val if r.get("best")]
        if best:
            ax.axvline(best[-1]["epoch"], color="tab:orange", ls=":", lw=1,
                       label=f"best validation (epoch {best[-1]['epoch']})")
    r = run.test_results().get(run.cfg["data.name"])  # the record collect_results counts
    if r is not None:
        epoch = r.get("epoch") or (val[-1]["epoch"] if val else train[-1]["epoch"])
        acc, ci = 100 * r["accuracy"], 100 * r.get("ci95", 0.0)
        shown += [acc - ci, acc + ci]
        ax.errorbar([epoch], [acc], yerr=[ci], fmt="s", color="tab:green", capsize=4,
                    label=f"test {acc:.2f} ± {ci:.2f} ({r.get('num_tasks', '?')} tasks)")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"Accuracy\n{run_title(run)}",
           ylim=fitted_limits(shown))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, stem, formats)


def plot_run(run: Run, out: Path, formats: tuple[str, ...], view: str) -> list[Path]:
    """All per-run figures of one run into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    return (plot_sparsity_over_training(run, out / "sparsity_over_training", formats, view)
            + plot_final_sparsity(run, out / "sparsity_final", formats)
            + plot_accuracy(run, out / "accuracy", formats))


def sweep_points(runs: list[Run], key: str) -> dict[str, dict[float, list[tuple[float, float]]]]:
    """Series label -> key value -> [(test accuracy %, ci95 %) per seed]. A series holds runs whose
    configs agree on all but `key` and SEED_POOLED keys; namesakes are told apart by the keys that
    differ. Pooled seeds and runs left out are reported on stderr."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        c = run.cfg
        if key not in c:
            raise KeyError(f"{run.path}: config has no key {key!r}")
        if run.test_results().get(c["data.name"]) is None:
            warn(f"{run.path} has no test result on {c['data.name']}; left out of the sweep")
            continue
        name = (f"{label(method_of(c))}, {ARCH_LABELS.get(c['model.arch'], c['model.arch'])}, "
                f"{c['data.num_shots']}-shot")
        if run.protocol not in ("reference", PROTOCOL_NONE):
            name += f" ({run.protocol})"
        rest = tuple(sorted((k, repr(v)) for k, v in c.items()
                            if k != key and k not in SEED_POOLED))
        groups.setdefault((name, run.cell, rest), []).append(run)
    series: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for (name, _, rest), members in groups.items():
        namesakes = [dict(g[2]) for g in groups if g[0] == name]
        if len(namesakes) > 1:  # name the keys in which this series differs from its namesakes
            name += ", " + ", ".join(f"{k}={v}" for k, v in rest
                                     if len({n.get(k) for n in namesakes}) > 1)
        by_value: dict[float, list[Run]] = {}
        for run in members:
            by_value.setdefault(float(run.cfg[key]), []).append(run)
        for value, pooled in by_value.items():
            found = [run.test_results()[run.cfg["data.name"]] for run in pooled]
            series.setdefault(name, {}).setdefault(value, []).extend(
                (100 * r["accuracy"], 100 * r.get("ci95", 0.0)) for r in found)
            if len(pooled) > 1:
                warn(f"sweep point {name}, {key}={value:g}: {len(pooled)} runs pooled as seeds "
                     f"{sorted(run.cfg['run.seed'] for run in pooled)} (mean ± 95% interval over "
                     "the seeds)")
    return series


def point_interval(found: list[tuple[float, float]]) -> tuple[float, float]:
    """(mean, 95% half-width) of one sweep point: one run's interval over its test tasks, or
    the Student-t interval of the mean over the seeds' accuracies."""
    accs = [a for a, _ in found]
    if len(accs) == 1:
        return accs[0], found[0][1]
    return (statistics.fmean(accs),
            stats.t.ppf(0.975, len(accs) - 1) * statistics.stdev(accs) / math.sqrt(len(accs)))


def plot_sweep(runs: list[Run], key: str, stem: Path, formats: tuple[str, ...]) -> list[Path]:
    """Test accuracy against the swept key: a line per sweep_points series, point_interval bars."""
    series = sweep_points(runs, key)
    if not series:
        raise ValueError("no run of the sweep has a test result")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    shown: list[float] = []
    seeds = False
    for i, (name, points) in enumerate(sorted(series.items())):
        xs = sorted(points)
        ys, errs = zip(*(point_interval(points[x]) for x in xs))
        seeds |= any(len(points[x]) > 1 for x in xs)
        shown += [y - e for y, e in zip(ys, errs)] + [y + e for y, e in zip(ys, errs)]
        # Shifted sideways by a few points (on a log axis as well) so intervals stay apart.
        shift = ScaledTranslation((i - (len(series) - 1) / 2) * 4 / 72, 0, fig.dpi_scale_trans)
        ax.errorbar(xs, ys, yerr=errs, capsize=3, lw=1.6, ms=6, label=name,
                    transform=ax.transData + shift, **line_style(i, sweep=True))
    values = sorted({x for p in series.values() for x in p})
    if len(values) > 2 and values[0] > 0 and values[-1] / values[0] >= 10:
        ax.set_xscale("log")
        ax.set_xlim(values[0] / 1.3, values[-1] * 1.3)
    else:  # set here: shifted lines would otherwise stretch the autoscaled axis
        pad = 0.08 * (values[-1] - values[0]) or 0.5 * max(abs(values[0]), 1.0)
        ax.set_xlim(values[0] - pad, values[-1] + pad)
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()  # log-scale minor labels would overprint the swept values
    over = "test tasks (one run) or seeds" if seeds else "test tasks"
    ax.set(xlabel=key, ylabel="test accuracy (%)", ylim=fitted_limits(shown),
           title=f"Test accuracy against {key}\n(bars: 95% interval over {over})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, stem, formats)


def parse_formats(text: str) -> tuple[str, ...]:
    """'png,pdf' -> ('png', 'pdf'); argparse type."""
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    if not formats or any(f not in FORMATS for f in formats):
        raise argparse.ArgumentTypeError(f"--format takes a comma-separated list of "
                                         f"{', '.join(FORMATS)}; got {text!r}")
    return formats


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
    parser.add_argument("--format", type=parse_formats, default=("png", "pdf"),
                        help="comma-separated file formats: png, pdf, svg (default png,pdf)")
    parser.add_argument("--layers", choices=("conv", "blocks", "all"), default="conv",
                        help="sparsity lines: conv weights (per block beyond eight), blocks (and "
                             "the head), or all masked tensors, biases and BatchNorm included "
                             "(default conv)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report_left_out(runs)
    if args.sweep:
        out = Path(args.out) if args.out else default_out(runs)
        out.mkdir(parents=True, exist_ok=True)
        try:
            paths = plot_sweep(runs, args.key, out / f"sweep_{args.key.replace('.', '_')}",
                               args.format)
        except (KeyError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for path in paths:
            print(f"wrote {path}")
        return 0
    for run in runs:
        out = Path(args.out) if args.out else run.path
        if args.out and len(runs) > 1:
            out = out / run.path.name
        for path in plot_run(run, out, args.format, args.layers):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
