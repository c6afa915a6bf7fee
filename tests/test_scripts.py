"""The launcher (run_sparse_MAML.sh), utils/collect_results.py and utils/plot_sparsity.py."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_maml.config import load_config
from sparse_maml.run_folder import write_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "run_sparse_MAML.sh"
COLLECT = ROOT / "utils" / "collect_results.py"
PLOT = ROOT / "utils" / "plot_sparsity.py"
# Tiny runs are several times faster with one intra-op thread on a busy CPU.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def run(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def rows() -> list[str]:
    return run(LAUNCHER, "--list").stdout.split()


def parse_command(line: str) -> tuple[str, list[str]]:
    """(config path, overrides) of one `python train.py -c CONFIG key=value ...` line."""
    words = shlex.split(line)
    assert words[1:3] == ["train.py", "-c"], line
    return words[3], words[4:]


# ---------------------------------------------------------------------------------------------
# run_sparse_MAML.sh


def test_every_row_has_a_config_and_every_config_a_row():
    configs = {p.stem for p in (ROOT / "configs").glob("*.yaml")} - {"demo", "paper_results"}
    assert sorted(rows()) == sorted(configs)
    assert len(rows()) == 34


@pytest.mark.parametrize("debug", [False, True])
def test_dry_run_prints_one_command_per_row_with_the_right_shots(debug):
    """One line per row; every '1shot' row trains 1-shot (the reference's script passed 5)."""
    out = run(LAUNCHER, "--dry-run", *(["--debug"] if debug else [])).stdout.strip().splitlines()
    out = [line for line in out if not line.startswith("# set ")]  # the two sets' headings
    assert len(out) == len(rows())
    dirs = set()
    for row, line in zip(rows(), out):
        config, overrides = parse_command(line)
        assert config == f"configs/{row}.yaml"
        cfg = load_config(ROOT / config, overrides)
        assert cfg.data.num_shots == (1 if "_1shot" in row else 5), row
        assert cfg.data.name == ("synthetic" if debug else "miniimagenet")
        assert cfg.run.name == row
        dirs.add(cfg.run.dir)
    assert len(dirs) == len(out)  # every run into its own folder


def test_dry_run_of_named_rows_with_seeds_sweep_and_overrides():
    out = run(LAUNCHER, "--dry-run", "--seeds", "2", "--sweep", "inner.step_size=0.05,0.5",
              "--out", "/tmp/somewhere", "sparse_maml_conv4_1shot", "maml_conv4_5shot",
              "run.device=cpu").stdout.strip().splitlines()
    assert len(out) == 2 * 2 * 2
    seen = set()
    for line in out:
        config, overrides = parse_command(line)
        cfg = load_config(ROOT / config, overrides)
        assert cfg.run.device == "cpu"
        assert cfg.run.dir == f"/tmp/somewhere/{cfg.run.name}"
        row = Path(config).stem
        assert cfg.run.name == f"{row}-step_size-{cfg.inner.step_size:g}-seed{cfg.run.seed}"
        seen.add((row, cfg.inner.step_size, cfg.run.seed))
    assert len(seen) == 8


def test_launcher_takes_a_config_file_from_anywhere_and_runs_python_from_PYTHON(tmp_path):
    """A row may be the path of any YAML config (relative to where the script is started); the
    runs use the interpreter named by PYTHON."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "variant.yaml").write_text("inner:\n  step_size: 0.3\n")
    result = subprocess.run([str(LAUNCHER), "--dry-run", "--seeds", "2", "exp/variant.yaml",
                             "maml_conv4_1shot"], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert all(shlex.split(line)[0] == sys.executable for line in lines)
    config, overrides = parse_command(lines[1])
    assert config == str(tmp_path / "exp" / "variant.yaml")
    cfg = load_config(config, overrides)
    assert (cfg.inner.step_size, cfg.run.name, cfg.run.seed) == (0.3, "variant-seed1", 1)
    assert parse_command(lines[2])[0] == "configs/maml_conv4_1shot.yaml"
    missing = subprocess.run([str(LAUNCHER), "--dry-run", "exp/none.yaml"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nor a YAML file exp/none.yaml" in missing.stderr


def test_launcher_rejects_unknown_rows_and_options():
    assert run(LAUNCHER, "--dry-run", "no_such_row", check=False).returncode == 2
    assert run(LAUNCHER, "--frobnicate", check=False).returncode == 2
    assert run(LAUNCHER, "--seeds", "0", check=False).returncode == 2


@pytest.fixture(scope="module")
def debug_runs(tmp_path_factory) -> Path:
    """Two real debug runs made by the launcher (one row, two seeds)."""
    out = tmp_path_factory.mktemp("runs")
    result = run(LAUNCHER, "--debug", "--seeds", "2", "--out", out, "sparse_maml_conv4_5shot")
    assert "== sparse_maml_conv4_5shot-seed1" in result.stdout
    return out


def test_launcher_debug_run_trains_and_skips_finished_runs(debug_runs):
    for seed in (0, 1):
        folder = debug_runs / f"sparse_maml_conv4_5shot-seed{seed}"
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert {r["kind"] for r in records} >= {"train", "val", "test"}
        assert load_config(folder / "config.yaml").run.seed == seed
    again = run(LAUNCHER, "--debug", "--seeds", "2", "--out", debug_runs, "sparse_maml_conv4_5shot")
    assert again.stdout.count("done already") == 2


def test_collect_and_plot_real_debug_runs(debug_runs, tmp_path):
    result = run(sys.executable, COLLECT, debug_runs, "--out", tmp_path)
    assert "| sparse-MAML | Conv4 | 2-way 5-shot | reference | synthetic | synthetic |" in result.stdout
    assert "(std, n=2)" in result.stdout
    run(sys.executable, PLOT, debug_runs / "sparse_maml_conv4_5shot-seed0", "--out", tmp_path)
    assert_pngs(tmp_path, ["sparsity_over_training.png", "sparsity_final.png", "accuracy.png"])


# ---------------------------------------------------------------------------------------------
# Fabricated run folders


def fabricate(root: Path, name: str, row: str, overrides: list[str] = (),
              tests: list[dict] = (), epochs: int = 6) -> Path:
    """A run folder as train.py writes it, with made-up metrics."""
    folder = root / name
    folder.mkdir(parents=True)
    cfg = load_config(ROOT / "configs" / f"{row}.yaml", [*overrides, f"run.dir={folder}"])
    write_config(cfg, folder / "config.yaml")
    layers = ["body.block1.conv.weight", "body.block2.conv.weight", "body.block3.conv.weight",
              "body.block4.conv.weight", "head.weight"]
    records = []
    for epoch in range(1, epochs + 1):
        record = {"kind": "train", "step": 100 * epoch, "epoch": epoch, "loss": 1.0 / epoch,
                  "accuracy": 0.3 + 0.05 * epoch}
        if cfg.inner.mask != "none":
            sparsity = {n: min(0.95, 0.5 + 0.04 * epoch * (i + 1) / len(layers))
                        for i, n in enumerate(layers)}
            record |= {"mask_sparsity": sum(sparsity.values()) / len(layers),
                       "layer_sparsity": sparsity}
        records.append(record)
        records.append({"kind": "val", "step": 100 * epoch, "epoch": epoch,
                        "accuracy": 0.3 + 0.04 * epoch, "ci95": 0.01, "best": True,
                        "best_epoch": epoch})
    for test in tests:
        record = {"kind": "test", "step": 100 * epochs, "dataset": cfg.data.name, "split": "test",
                  "num_tasks": 600, "steps": 35, "epoch": epochs, **test}
        if cfg.inner.mask != "none":
            record.setdefault("sparsity", {n: 0.6 for n in layers} | {"mean": 0.6})
        records.append(record)
    with open(folder / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return folder


@pytest.fixture()
def fabricated(tmp_path) -> Path:
    runs = tmp_path / "runs"
    fabricate(runs, "a", "sparse_maml_conv4_5shot", tests=[
        {"accuracy": 0.65, "ci95": 0.008},
        {"dataset": "cub", "accuracy": 0.45, "ci95": 0.01},
        {"dataset": "cars", "accuracy": 0.40, "ci95": 0.012},
        {"dataset": "tieredimagenet", "accuracy": 0.55, "ci95": 0.009},
        # test.py with another eval step count: another experiment, left out of the table
        {"accuracy": 0.99, "ci95": 0.01, "overrides": ["inner.eval_steps=100"]},
    ])
    for seed, acc in enumerate((0.47, 0.48, 0.49)):
        fabricate(runs, f"seeds/x{seed}", "maml_conv4_1shot_finn_protocol", [f"run.seed={seed}"],
                  tests=[{"accuracy": acc, "ci95": 0.02}])
    fabricate(runs, "same", "maml_conv4_1shot", tests=[{"accuracy": 0.51, "ci95": 0.01}])
    fabricate(runs, "unfinished", "sparse_relu_maml_resnet12_5shot")  # no test record yet
    fabricate(runs, "boil", "boil_resnet12_1shot", tests=[{"accuracy": 0.5, "ci95": 0.01}])
    return runs


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_collect_results_prints_the_expected_table(fabricated, tmp_path):
    result = run(sys.executable, COLLECT, fabricated, "--out", tmp_path / "out")
    lines = table_lines(result.stdout)
    expected = [
        "| MAML | Conv4 | 5-way 1-shot | finn2017 | miniimagenet | miniimagenet |  | 48.00 ± 1.00 (std, n=3) | 48.07 | 3 | 600 |",
        "| sparse-MAML | Conv4 | 5-way 5-shot | reference | miniimagenet | miniimagenet |  | 65.00 ± 0.80 | 67.03 | 1 | 600 |",
        "| sparse-MAML | Conv4 | 5-way 5-shot | reference | miniimagenet | cars (cross-domain) |  | 40.00 ± 1.20 | – | 1 | 600 |",
        "| sparse-MAML | Conv4 | 5-way 5-shot | reference | miniimagenet | cub (cross-domain) |  | 45.00 ± 1.00 | – | 1 | 600 |",
        "| sparse-MAML | Conv4 | 5-way 5-shot | reference | miniimagenet | tieredimagenet (cross-domain) |  | 55.00 ± 0.90 | – | 1 | 600 |",
        "| BOIL | ResNet-12 | 5-way 1-shot | reference | miniimagenet | miniimagenet |  | 50.00 ± 1.00 | – | 1 | 600 |",
        # The same method under the reference's protocol: no published number beside it.
        "| MAML | Conv4 | 5-way 1-shot | reference | miniimagenet | miniimagenet |  | 51.00 ± 1.00 | none under this protocol (48.07 is finn2017's) | 1 | 600 |",
    ]
    for line in expected:
        assert line in lines, f"missing {line!r} in\n{result.stdout}"
    assert lines.index(expected[1]) < lines.index(expected[2])  # in-domain before cross-domain
    assert "unfinished" in result.stderr  # told, not tabulated
    assert "99.00" not in result.stdout
    # The paper-style grid: ours (paper) per setting and method.
    assert "| 5-shot, Conv4 |" in result.stdout and "65.00 ± 0.80 (67.03)" in result.stdout
    written = (tmp_path / "out" / "results.md").read_text()
    assert written.startswith("<!-- written by utils/collect_results.py -->\n\n")  # its mark
    assert written.split("\n\n", 1)[1].strip() in result.stdout
    with open(tmp_path / "out" / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 7
    maml = next(r for r in csv_rows if r["method"] == "maml" and r["protocol"] == "finn2017")
    assert (maml["num_seeds"], maml["accuracy"], maml["std"], maml["paper"]) == ("3", "48.0000", "1.0000", "48.07")
    same = next(r for r in csv_rows if r["method"] == "maml" and r["protocol"] == "reference")
    assert same["paper"] == "" and "finn2017" in same["paper_note"]
    assert "3 runs pooled as seeds [0, 1, 2]" in result.stderr
    cub = next(r for r in csv_rows if r["dataset"] == "cub")
    assert (cub["cross_domain"], cub["ci95"], cub["paper"]) == ("True", "1.0000", "")


def test_collect_results_identifies_cells_from_config_not_folder(tmp_path):
    """A misleading folder name does not matter; a sweep's variants stay separate rows."""
    runs = tmp_path / "runs"
    fabricate(runs, "maml_resnet12_5shot", "sparse_relu_maml_conv4_1shot",
              tests=[{"accuracy": 0.5, "ci95": 0.01}])
    fabricate(runs, "s1", "sparse_maml_conv4_5shot", ["inner.step_size=0.05"],
              tests=[{"accuracy": 0.6, "ci95": 0.01}])
    fabricate(runs, "s2", "sparse_maml_conv4_5shot", ["inner.step_size=0.5"],
              tests=[{"accuracy": 0.62, "ci95": 0.01}])
    text = run(sys.executable, COLLECT, runs).stdout
    assert "| sparse-ReLU-MAML | Conv4 | 5-way 1-shot |" in text
    assert "| 50.00 ± 1.00 | 50.15 (first README: 50.39) |" in text
    assert "| inner.step_size=0.05 | 60.00 ± 1.00 |" in text
    assert "| inner.step_size=0.5 | 62.00 ± 1.00 |" in text
    assert (runs / "results.md").is_file() and (runs / "results.csv").is_file()  # default --out


def test_collect_results_without_runs_fails_cleanly(tmp_path):
    result = run(sys.executable, COLLECT, tmp_path, check=False)
    assert result.returncode == 2 and "no run folder" in result.stderr


# ---------------------------------------------------------------------------------------------
# plot_sparsity.py


def assert_pngs(folder: Path, names: list[str]) -> None:
    for name in names:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_plot_sparsity_writes_the_run_figures(fabricated):
    run(sys.executable, PLOT, fabricated / "a")
    assert_pngs(fabricated / "a", ["sparsity_over_training.png", "sparsity_final.png", "accuracy.png"])
    # A run without a mask (MAML) gets its accuracy curves only.
    out = run(sys.executable, PLOT, fabricated / "seeds" / "x0").stdout
    assert_pngs(fabricated / "seeds" / "x0", ["accuracy.png"])
    assert out.count("wrote ") == 2  # accuracy.png and accuracy.pdf
    assert not (fabricated / "seeds" / "x0" / "sparsity_final.png").exists()


def test_plot_sweep_draws_accuracy_against_the_step_size(tmp_path):
    runs = tmp_path / "sweep"
    for i, alpha in enumerate((0.05, 0.1, 0.25, 0.5)):
        fabricate(runs, f"sparse-{alpha}", "sparse_maml_conv4_5shot", [f"inner.step_size={alpha}"],
                  tests=[{"accuracy": 0.66 - 0.005 * i, "ci95": 0.01}])
        for seed in (0, 1):
            fabricate(runs, f"maml-{alpha}-{seed}", "maml_conv4_5shot",
                      [f"inner.step_size={alpha}", f"run.seed={seed}"],
                      tests=[{"accuracy": 0.6 - 0.05 * i + 0.01 * seed, "ci95": 0.01}])
    out = run(sys.executable, PLOT, "--sweep", *sorted(runs.iterdir()), "--key", "inner.step_size",
              "--out", tmp_path / "figs").stdout
    assert "sweep_inner_step_size.png" in out
    assert_pngs(tmp_path / "figs", ["sweep_inner_step_size.png"])
    missing = run(sys.executable, PLOT, "--sweep", runs, "--key", "inner.no_such_key", check=False)
    assert missing.returncode == 1 and "no_such_key" in missing.stderr
