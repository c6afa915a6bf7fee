"""train.py and test.py end to end on a tiny debug config, as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_train_then_test_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("run.tensorboard")]
    train = run(str(ROOT / "train.py"), *overrides, f"run.dir={run_dir}", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert re.search(r"test accuracy \(synthetic, 6 tasks.*\): [\d.]+% \+- [\d.]+%", train.stdout)
    assert "mask sparsity" in train.stdout and "head.weight" in train.stdout

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["widths"] == [4, 4, 4, 4] and config["inner"]["mask"] == "binary_ste"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 2 and kinds.count("val") == 2 and kinds.count("test") == 1
    train_record = next(r for r in records if r["kind"] == "train")
    assert 0 <= train_record["mask_sparsity"] <= 1
    assert "body.block1.conv.weight" in train_record["layer_sparsity"]
    assert (run_dir / "best.pt").is_file()
    assert list(run_dir.glob("events.out.tfevents.*")), "TensorBoard is on by default"

    test = run(str(ROOT / "test.py"), str(run_dir), "train.num_test_tasks=9", "inner.eval_steps=3",
               cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert re.search(r"synthetic/test: [\d.]+% \+- [\d.]+% \(95% CI over 9 tasks, 3 inner steps",
                     test.stdout)

    plot = run(str(ROOT / "utils" / "plot_sparsity.py"), str(run_dir), cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr[-3000:]
    pngs = list(run_dir.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_typo_in_override_is_a_clear_error(tmp_path):
    result = run(str(ROOT / "train.py"), "inner.stepz=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown key inner.stepz" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists(), "a failed config must not leave a run folder"


def test_miniimagenet_run_with_cross_domain_test(tmp_path):
    """Train on a tiny MiniImageNet (pickle layout), then test on CUB automatically."""
    import fixtures

    mini = fixtures.write_miniimagenet(tmp_path / "mini", "pickle",
                                       fixtures.make_miniimagenet(per_class=4))
    cub = fixtures.write_cub(tmp_path / "cub", per_class=4, size=40)
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if "num_test_tasks" not in o and "epochs" not in o]
    result = run(str(ROOT / "train.py"), *overrides, "data.name=miniimagenet", f"data.root={mini}",
                 "data.num_ways=3", "data.num_shots=1", "train.epochs=1", "train.num_test_tasks=3",
                 f"cross_domain.cub={cub}", f"run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"test accuracy \(miniimagenet, 3 tasks", result.stdout)
    assert re.search(r"test accuracy \(cub, 3 tasks", result.stdout)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["dataset"] for r in records if r["kind"] == "test"] == ["miniimagenet", "cub"]
