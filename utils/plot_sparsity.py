"""Paper-style figures from run folders (metrics.jsonl + config.yaml), as PNG and PDF.

    python utils/plot_sparsity.py runs/sparse_maml_conv4_5shot          # figures of one run
    python utils/plot_sparsity.py runs/a runs/b --out figures/ --format png,svg
    python utils/plot_sparsity.py runs/x --layers all                   # every masked tensor
    python utils/plot_sparsity.py --sweep runs/robustness --key inner.step_size   # runs below it

Per run (into the run folder, or --out), each in every --format (default png,pdf):
- sparsity_over_training: mask sparsity per epoch, with the mean over all masked entries.
  --layers conv (default): one line per conv weight, or per block when there are more than eight
  (ResNet-12), weighted by the number of entries; blocks: always per block (and the head);
  all: every masked tensor, biases and BatchNorm included (their few entries make jumpy lines);
- sparsity_final: sparsity per tensor of the tested (best-validation) masks, as bars;
- accuracy: meta-training query accuracy per epoch, validation accuracy with its 95% interval,
  and the test accuracy of the best checkpoint; the y-axis is fitted to the data.
Runs without a mask (MAML, ANIL, BOIL) get the accuracy figure only. The test record shown is the
one utils/collect_results.py counts (see its docstring); records left out are reported on stderr.

--sweep: test accuracy against a config key (inner.step_size, inner.steps, ...) for runs that
differ in that key, one line per method/architecture/shots/protocol and per setting of any other
key that differs (named in the legend, never merged), with 95% intervals: over the test tasks
(one seed) or over the seeds (Student t, two or more): the paper's claim that sparse-MAML is
robust to the inner step size and step count. Lines differ in dash and marker as well as colour
(readable in greyscale), and are shifted sideways a little so that their intervals do not overlap.
Written as sweep_<key>.<format> into --out (default: the common parent folder of the runs).
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
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import ScaledTranslation  # noqa: E402
from scipy import stats  # noqa: E402

import torch  # noqa: E402

from sparse_maml.config import SEED_POOLED, is_custom_arch  # noqa: E402
from sparse_maml.models import build_model, conv_weight_names  # noqa: E402
from sparse_maml.results import (ARCH_LABELS, PROTOCOL_NONE, Run, default_out, find_runs,  # noqa: E402
                                 label, method_of, report_left_out, warn)

FORMATS = ("png", "pdf", "svg")
LAYER_VIEWS = ("conv", "blocks", "all")
MAX_LINES = 8  # more conv weights than this are drawn per block
# Distinguishable in colour, dash pattern and marker, and in greyscale print.
COLOURS = plt.cm.tab10.colors
DASHES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def line_style(i: int) -> dict:
    """Colour, dash and marker of line i: no two of the first 40 lines look alike."""
    return {"color": COLOURS[i % len(COLOURS)], "ls": DASHES[(i // len(COLOURS)) % len(DASHES)],
            "marker": MARKERS[i % len(MARKERS)]}


def sweep_style(i: int) -> dict:
    """Line i of a sweep figure: dash and marker change with every line (greyscale print keeps
    the first four apart by dash alone, the first eight by marker), colour as well."""
    return {"color": COLOURS[i % len(COLOURS)], "ls": DASHES[i % len(DASHES)],
            "marker": MARKERS[i % len(MARKERS)], "mfc": "white" if i % 2 else None}


def save(fig, stem: Path, formats: tuple[str, ...]) -> list[Path]:
    """Write the figure once per format (PNG at 150 dpi; PDF and SVG are vector)."""
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def tensor_sizes(run: Run) -> dict[str, tuple[int, bool]]:
    """Parameter name -> (number of entries, is a conv weight), from the model the config builds
    (on the meta device: nothing is allocated). Empty for a backbone of your own: building it would
    import the code the run folder names."""
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
    if unknown:
        view = "all"
    conv = [n for n in names if n in sizes and sizes[n][1]]
    if view == "conv" and (len(conv) > MAX_LINES or not conv):
        view = "blocks"
    if view == "all":
        groups = {n: [n] for n in names}
    elif view == "conv":
        groups = {n: [n] for n in conv}
    else:  # blocks: conv weights of each block, entry-weighted, and the head's weight
        groups = {}
        for n in names:
            if sizes[n][1] or (n.startswith("head.") and n.endswith("weight")):
                groups.setdefault(block_of(n), []).append(n)
    series = {}
    for group, members in groups.items():
        weights = [sizes[n][0] if n in sizes else 1 for n in members]
        values = []
        for record in train:
            layer = record["layer_sparsity"]
            if all(n in layer for n in members):
                values.append(100 * sum(layer[n] * w for n, w in zip(members, weights)) / sum(weights))
            else:
                values.append(math.nan)
        label_text = group if len(members) == 1 else f"{group} ({len(members)} conv weights)"
        series[label_text] = values
    return series


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


def plot_sparsity_over_training(run: Run, stem: Path, formats: tuple[str, ...],
                                view: str = "conv") -> list[Path]:
    """Sparsity per epoch of the chosen tensors and of all masked entries. [] if no mask."""
    train = [r for r in records(run, "train") if r.get("layer_sparsity")]
    if not train:
        return []
    epochs = [r["epoch"] for r in train]
    series = sparsity_series(run, train, view)
    mark = len(epochs) <= 30
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, values) in enumerate(series.items()):
        style = line_style(i)
        if not mark:
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
    """Bars: sparsity per masked tensor, input side first, one colour per block. [] if no mask."""
    sparsity = final_sparsity(run)
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


def fitted_limits(values: list[float], pad: float = 0.08) -> tuple[float, float]:
    """An accuracy axis around the data (within 0-100), with a margin."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 100.0
    low, high = min(finite), max(finite)
    margin = max(1.0, pad * (high - low))
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
        shown += [a - c for a, c in zip(y, ci)] + [a + c for a, c in zip(y, ci)]
        ax.plot(x, y, label="validation (95% CI band)", color="tab:orange", marker="o", ms=3)
        ax.fill_between(x, [a - c for a, c in zip(y, ci)], [a + c for a, c in zip(y, ci)],
                        color="tab:orange", alpha=0.2)
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


def plot_run(run: Run, out: Path, formats: tuple[str, ...] = ("png", "pdf"),
             view: str = "conv") -> list[Path]:
    """All per-run figures of one run into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    return (plot_sparsity_over_training(run, out / "sparsity_over_training", formats, view)
            + plot_final_sparsity(run, out / "sparsity_final", formats)
            + plot_accuracy(run, out / "accuracy", formats))


def sweep_points(runs: list[Run], key: str) -> dict[str, dict[float, list[tuple[float, float]]]]:
    """Series label -> key value -> [(test accuracy %, ci95 %) per seed].

    Runs are in one series only when their configs agree on everything but `key`, the seed and
    housekeeping keys; series that share a method/arch/shots label are told apart by the keys in
    which they differ. Pooled seeds and runs left out are reported on stderr.
    """
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if key not in run.cfg:
            raise KeyError(f"{run.path}: config has no key {key!r}")
        if run.test_results().get(run.cfg["data.name"]) is None:
            warn(f"{run.path} has no test result on {run.cfg['data.name']}; left out of the sweep")
            continue
        rest = tuple(sorted((k, repr(v)) for k, v in run.cfg.items()
                            if k != key and k not in SEED_POOLED))
        groups.setdefault((run.cell, run.protocol, rest), []).append(run)
    by_name: dict[str, list[tuple]] = {}
    for group in groups:
        c = groups[group][0].cfg
        name = (f"{label(method_of(c))}, {ARCH_LABELS.get(c['model.arch'], c['model.arch'])}, "
                f"{c['data.num_shots']}-shot")
        if group[1] not in ("reference", PROTOCOL_NONE):
            name += f" ({group[1]})"
        by_name.setdefault(name, []).append(group)
    series: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for name, members in by_name.items():
        for group in members:
            settings = dict(group[2])
            if len(members) > 1:  # name the keys in which this series differs from its namesakes
                differing = sorted(k for k in settings
                                   if len({dict(g[2]).get(k) for g in members}) > 1)
                full = f"{name}, " + ", ".join(f"{k}={settings[k]}" for k in differing)
            else:
                full = name
            points = series.setdefault(full, {})
            for run in groups[group]:
                r = run.test_results()[run.cfg["data.name"]]
                points.setdefault(float(run.cfg[key]), []).append(
                    (100 * r["accuracy"], 100 * r.get("ci95", 0.0)))
            for value, found in points.items():
                if len(found) > 1:
                    seeds = sorted(run.cfg["run.seed"] for run in groups[group]
                                   if float(run.cfg[key]) == value)
                    warn(f"sweep point {full}, {key}={value:g}: {len(found)} runs pooled as seeds "
                         f"{seeds} (mean ± 95% interval over the seeds)")
    return series


def point_interval(found: list[tuple[float, float]]) -> tuple[float, float]:
    """(mean, 95% half-width) of one sweep point: one run's interval over its test tasks, or
    the Student-t interval of the mean over the seeds' accuracies."""
    accs = [a for a, _ in found]
    if len(accs) == 1:
        return accs[0], found[0][1]
    return (statistics.fmean(accs),
            stats.t.ppf(0.975, len(accs) - 1) * statistics.stdev(accs) / math.sqrt(len(accs)))


def plot_sweep(runs: list[Run], key: str, stem: Path,
               formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Test accuracy against the swept key, one line per series (see sweep_points), with 95%
    intervals (see point_interval)."""
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
                    transform=ax.transData + shift, **sweep_style(i))
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
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
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
    parser.add_argument("--layers", choices=LAYER_VIEWS, default="conv",
                        help="sparsity lines: conv weights (per block beyond eight), blocks, or "
                             "all masked tensors (default conv)")
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
        out = Path(args.out) / run.path.name if args.out and len(runs) > 1 else (
            Path(args.out) if args.out else run.path)
        for path in plot_run(run, out, args.format, args.layers):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
