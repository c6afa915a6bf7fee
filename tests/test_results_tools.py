"""utils/collect_results.py and utils/plot_sparsity.py: which test record counts, published numbers
only beside their protocol, nothing left out or pooled silently, damaged logs, figure views."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import plot_sparsity
from helpers import TINY
from sparse_maml import results
from sparse_maml.config import load_config
from test_scripts import COLLECT, ENV, LAUNCHER, PLOT, ROOT, fabricate, table_lines


def script(path: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(path), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# A damaged metrics.jsonl


@pytest.mark.parametrize("tool", [COLLECT, PLOT], ids=["collect_results", "plot_sparsity"])
def test_half_written_last_line_is_skipped_with_a_warning(tool, tmp_path):
    folder = fabricate(tmp_path / "runs", "a", "sparse_maml_conv4_5shot",
                       tests=[{"accuracy": 0.65, "ci95": 0.008}])
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"kind": "test", "step": 600, "dataset": "miniim')  # killed mid-write
    result = script(tool, folder, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{folder / 'metrics.jsonl'}: line 14 is incomplete" in result.stderr
    if tool == COLLECT:
        assert "| 65.00 ± 0.80 | 67.03 |" in result.stdout  # the complete records still count


def test_a_broken_line_inside_the_file_is_a_clear_error(tmp_path):
    folder = fabricate(tmp_path / "runs", "a", "sparse_maml_conv4_5shot",
                       tests=[{"accuracy": 0.65, "ci95": 0.008}])
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for tool in (COLLECT, PLOT):
        result = script(tool, folder)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"{folder / 'metrics.jsonl'}: line 3 is not valid JSON" in result.stderr


# ---------------------------------------------------------------------------------------------
# Which test record counts: the same one in the table and in the figure


def test_records_of_test_py_count_unless_they_change_the_experiment(tmp_path):
    collect = results
    folder = fabricate(tmp_path / "runs", "a", "sparse_maml_conv4_5shot", tests=[
        {"accuracy": 0.65, "ci95": 0.008},  # train.py: 600 tasks
        {"accuracy": 0.70, "ci95": 0.03, "num_tasks": 100, "overrides": ["train.num_test_tasks=100"]},
        {"accuracy": 0.651, "ci95": 0.004, "num_tasks": 2000,
         "overrides": ["train.num_test_tasks=2000", "inner.eval_steps=35"]},  # 35: the config's own
        {"accuracy": 0.99, "ci95": 0.01, "overrides": ["inner.eval_steps=100"]},
        {"accuracy": 0.5, "ci95": 0.01, "split": "val"},
    ])
    (run,) = collect.find_runs([str(folder)])
    chosen, left_out = run.select_tests()
    assert chosen["miniimagenet"]["num_tasks"] == 2000
    assert len(left_out) == 4
    assert any("inner.eval_steps=100 (another experiment)" in r for r in left_out)
    assert any("100 tasks (70.00%)" in r for r in left_out)

    table = script(COLLECT, folder)
    assert "| 65.10 ± 0.40 | 67.03 | 1 | 2000 |" in table.stdout
    assert "left out: miniimagenet record made with inner.eval_steps=100" in table.stderr
    assert "left out: miniimagenet record of 600 tasks (65.00%)" in table.stderr

    plot = plot_sparsity
    shown = []
    original = plot.plt.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        shown.append((list(y), kwargs.get("label")))
        return original(self, x, y, *args, **kwargs)

    plot.plt.Axes.errorbar = spy
    try:
        plot.plot_accuracy(run, tmp_path / "accuracy", ("png",))
    finally:
        plot.plt.Axes.errorbar = original
    assert shown == [([pytest.approx(65.1)], "test 65.10 ± 0.40 (2000 tasks)")]


def test_sweep_never_merges_runs_that_differ_in_another_key(tmp_path):
    """inner.steps swept over runs of two step sizes: two series, not one pooled line."""
    plot = plot_sparsity
    collect = results
    runs = tmp_path / "runs"
    for steps in (5, 35):
        for alpha in (0.1, 0.25):
            fabricate(runs, f"s{steps}-a{alpha}", "sparse_maml_conv4_5shot",
                      [f"inner.steps={steps}", f"inner.step_size={alpha}"],
                      tests=[{"accuracy": 0.6 + alpha / 10, "ci95": 0.01}])
        for seed in (0, 1):
            fabricate(runs, f"maml-s{steps}-{seed}", "maml_conv4_5shot",
                      [f"inner.steps={steps}", f"run.seed={seed}"],
                      tests=[{"accuracy": 0.55 + 0.01 * seed, "ci95": 0.01}])
    series = plot.sweep_points(collect.find_runs([str(runs)]), "inner.steps")
    assert sorted(series) == ["MAML, Conv4, 5-shot",
                              "sparse-MAML, Conv4, 5-shot, inner.step_size=0.1",
                              "sparse-MAML, Conv4, 5-shot, inner.step_size=0.25"]
    assert all(len(points) == 1 for s in series.values() for points in s.values()
               if s is not series["MAML, Conv4, 5-shot"])
    assert [len(series["MAML, Conv4, 5-shot"][v]) for v in (5.0, 35.0)] == [2, 2]
    result = script(PLOT, "--sweep", runs, "--key", "inner.steps", "--out", tmp_path / "figs",
                    "--format", "png,svg")
    assert result.returncode == 0, result.stderr
    assert "2 runs pooled as seeds [0, 1]" in result.stderr
    assert (tmp_path / "figs" / "sweep_inner_steps.svg").read_text().lstrip().startswith("<?xml")


def test_sweep_figure_of_tiny_runs_shows_each_runs_95_interval(tmp_path, monkeypatch):
    """An inner.steps sweep of tiny real sparse-MAML and MAML runs, laid out as the documented
    recipe lays them out: one line per method, each point at its run's test accuracy with that
    run's 95% interval; the two lines differ in dash and marker (greyscale print)."""
    from sparse_maml.cli import train

    plot, collect = plot_sparsity, results
    for method, extra in (("sparse_maml", []), ("maml", ["inner.mask=none"])):
        for steps in (1, 2):
            train.main(load_config(ROOT / "configs" / "demo.yaml", [
                *TINY, "model.widths=[2,2,2,2]", "data.num_ways=2", "data.num_query=3",
                "outer.meta_batch_size=1", "inner.eval_steps=1", "train.epochs=1",
                "train.batches_per_epoch=2", "train.num_val_tasks=2", "train.num_test_tasks=4",
                "train.eval_batch_size=4", "run.device=cpu", *extra,
                f"inner.steps={steps}", f"run.dir={tmp_path / 'runs' / method / f'demo-steps-{steps}'}"]))
    drawn = []
    original = plot.plt.Axes.errorbar

    def spy(self, x, y, yerr=None, **kwargs):
        drawn.append((kwargs["label"], list(x), list(y), list(yerr), kwargs["ls"], kwargs["marker"]))
        return original(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(plot.plt.Axes, "errorbar", spy)
    runs = collect.find_runs([str(tmp_path / "runs")])
    assert plot.plot_sweep(runs, "inner.steps", tmp_path / "sweep", ("png",)) == [tmp_path / "sweep.png"]
    expected = {}
    for run in runs:
        r = run.test_results()["synthetic"]
        expected.setdefault(collect.label(collect.method_of(run.cfg)), {})[run.cfg["inner.steps"]] = (
            100 * r["accuracy"], 100 * r["ci95"])
    assert sorted(d[0] for d in drawn) == ["MAML, Conv4, 1-shot", "sparse-MAML, Conv4, 1-shot"]
    for name, xs, ys, errs, _, _ in drawn:
        method = name.split(",")[0]
        assert xs == [1.0, 2.0]
        assert list(zip(ys, errs)) == [pytest.approx(expected[method][x]) for x in (1, 2)]
        assert all(e > 0 for e in errs)  # 4 test tasks of 6 query images: the accuracies vary
    assert drawn[0][4] != drawn[1][4] and drawn[0][5] != drawn[1][5]  # dash and marker differ


def test_sweep_point_pooling_seeds_is_the_student_t_interval():
    """Two seeds at 60% and 62%: mean 61, half-width t(0.975, 1) * std / sqrt(2) = 12.706."""
    plot = plot_sparsity
    mean, half = plot.point_interval([(60.0, 1.0), (62.0, 1.0)])
    assert mean == pytest.approx(61.0) and half == pytest.approx(12.7062, abs=1e-4)
    assert plot.point_interval([(60.0, 0.8)]) == (60.0, 0.8)  # one run: its interval over tasks


# ---------------------------------------------------------------------------------------------
# Published numbers only beside their protocol, in a debug run of the launcher


def test_debug_table_shows_protocols_and_numbers_only_where_they_belong(tmp_path):
    out = tmp_path / "runs"
    rows = ["maml_conv4_1shot_finn_protocol", "maml_conv4_1shot", "sparse_maml_conv4_1shot"]
    launched = subprocess.run([str(LAUNCHER), "--debug", "--out", str(out), *rows], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr
    result = script(COLLECT, out)
    maml = [line for line in table_lines(result.stdout) if line.startswith("| MAML |")]
    finn = next(line for line in maml if "| finn2017 |" in line)
    same = next(line for line in maml if "| reference |" in line)
    # Synthetic data: the number of the run's protocol is named but not claimed.
    assert "not comparable: 48.07 is miniimagenet 5-way" in finn
    assert "none under this protocol (48.07 is finn2017's)" in same
    sparse = next(line for line in table_lines(result.stdout) if line.startswith("| sparse-MAML |"))
    assert "not comparable: 50.35" in sparse
    assert "| protocol |" in result.stdout


def test_collect_results_rejects_a_paper_file_without_protocols(tmp_path):
    folder = fabricate(tmp_path / "runs", "a", "sparse_maml_conv4_5shot",
                       tests=[{"accuracy": 0.65, "ci95": 0.008}])
    bad = tmp_path / "paper.yaml"
    bad.write_text("accuracy:\n  sparse_maml:\n    conv4: {5: 67.03}\n")
    result = script(COLLECT, folder, "--paper", bad)
    assert result.returncode == 2 and "accuracy.sparse_maml.conv4.5 needs value, protocol" in result.stderr


# ---------------------------------------------------------------------------------------------
# Finn et al.'s loss scale, behind maml_conv4_*_finn_protocol's alpha and clamp


def test_finn_loss_scale_gives_the_configs_alpha_and_clamp():
    """cbfinn/maml's xent is the per-example cross-entropy / K, and tf.gradients sums it: the inner
    loss is N x our mean loss (alpha 0.01 there = 0.05 here), and the outer loss per task is
    N*Q/K x our mean, so its clip at 10 is a clip at 10*K/(N*Q) of our gradients."""
    from sparse_maml.config import load_config

    g = torch.Generator().manual_seed(0)
    ways, query = 5, 15
    for shots, name in ((1, "maml_conv4_1shot_finn_protocol"), (5, "maml_conv4_5shot_finn_protocol")):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        w = torch.randn(7, ways, generator=g, requires_grad=True)
        support = torch.randn(ways * shots, 7, generator=g)
        labels = torch.arange(ways).repeat_interleave(shots)
        finn = (F.cross_entropy(support @ w, labels, reduction="none") / shots).sum()
        ours = F.cross_entropy(support @ w, labels)
        (g_finn,), (g_ours,) = torch.autograd.grad(finn, w), torch.autograd.grad(ours, w)
        torch.testing.assert_close(0.01 * g_finn, cfg.inner.step_size * g_ours)
        q = torch.randn(ways * query, 7, generator=g)
        q_labels = torch.arange(ways).repeat_interleave(query)
        outer_finn = (F.cross_entropy(q @ w, q_labels, reduction="none") / shots).sum()
        outer_ours = F.cross_entropy(q @ w, q_labels)
        (o_finn,), (o_ours,) = torch.autograd.grad(outer_finn, w), torch.autograd.grad(outer_ours, w)
        scale = ways * query / shots
        torch.testing.assert_close(o_finn, scale * o_ours)
        assert cfg.outer.grad_clamp == pytest.approx(10 / scale)
        torch.testing.assert_close(o_finn.clamp(-10, 10),
                                   scale * o_ours.clamp(-cfg.outer.grad_clamp, cfg.outer.grad_clamp))


# ---------------------------------------------------------------------------------------------
# Figure views


def test_sparsity_views_conv_weights_blocks_and_all(tmp_path):
    plot = plot_sparsity
    collect = results
    folder = fabricate(tmp_path / "runs", "a", "sparse_maml_conv4_5shot")
    (run,) = collect.find_runs([str(folder)])
    train = [r for r in run.records if r["kind"] == "train"]
    assert list(plot.sparsity_series(run, train, "conv")) == [
        f"body.block{i}.conv.weight" for i in range(1, 5)]
    assert list(plot.sparsity_series(run, train, "all")) == list(train[-1]["layer_sparsity"])
    blocks = plot.sparsity_series(run, train, "blocks")
    assert list(blocks) == [f"body.block{i}" for i in range(1, 5)] + ["head"]
    # A ResNet-12 has 16 conv weights: the default view groups them per block, entry-weighted.
    resnet = collect.Run(run.path, {**run.cfg, "model.arch": "resnet12",
                                    "model.widths": [2, 4, 6, 8]}, [])
    sizes = plot.tensor_sizes(resnet)
    names = [n for n, (_, conv) in sizes.items() if conv] + ["head.weight", "head.bias"]
    layer = {n: (0.2 if "shortcut" in n else 0.8) for n in names}
    series = plot.sparsity_series(resnet, [{"epoch": 1, "layer_sparsity": layer}], "conv")
    assert list(series) == [f"body.block{i} (4 conv weights)" for i in range(1, 5)] + ["head"]
    n1 = sum(sizes[f"body.block1.conv{j}.weight"][0] for j in (1, 2, 3))
    n0 = sizes["body.block1.shortcut.0.weight"][0]
    assert series["body.block1 (4 conv weights)"][0] == pytest.approx(100 * (0.8 * n1 + 0.2 * n0) / (n1 + n0))


def test_accuracy_axis_fits_the_data():
    plot = plot_sparsity
    low, high = plot.fitted_limits([61.0, 63.5, 65.0])
    assert 55 < low < 61 and 65 < high < 70
    assert plot.fitted_limits([0.5, 99.8]) == (0.0, 100.0)
