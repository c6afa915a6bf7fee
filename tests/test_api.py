"""The Python API (sparse_maml.api): load a run, adapt, predict, read masks, evaluate as test.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import tiny_config
from sparse_maml import checkpoint
from sparse_maml.api import Learner
from sparse_maml.checkpoint import CheckpointError
from sparse_maml.config import ConfigError
from sparse_maml import evaluation

ROOT = Path(__file__).resolve().parents[1]


def _train(folder: Path, *overrides: str) -> Path:
    from sparse_maml.cli import train

    return train.main(tiny_config(f"run.dir={folder / 'run'}", "train.test_after_training=false",
                                  *overrides))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread) -> Path:
    return _train(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def learner(run_dir) -> Learner:
    return Learner.load(run_dir, device="cpu")


def test_test_equals_what_test_py_computes(run_dir, learner):
    accs, _ = evaluation.test_checkpoint(learner.config, run_dir, "test", torch.device("cpu"))
    result = learner.test()
    assert np.array_equal(result.accuracies, accs) and len(accs) == 6
    assert result.ci95 == pytest.approx(1.96 * accs.std(ddof=1) / np.sqrt(6))


def test_test_equals_test_py_for_sparse_maml_plus_too(tmp_path, one_thread):
    """The generator draws a random mask per task: both paths draw the same ones."""
    run = _train(tmp_path, "inner.mask_generator=true", "train.epochs=1", "train.batches_per_epoch=1",
                 "train.num_val_tasks=2")
    accs, _ = evaluation.test_checkpoint(Learner.load(run).config, run, "val", torch.device("cpu"))
    assert np.array_equal(Learner.load(run).test("val").accuracies, accs)


def test_adapt_and_predict_give_the_accuracies_evaluate_reports(learner):
    episodes = learner.episodes("test")
    tasks = [episodes[i] for i in range(6)]
    by_hand = []
    for task in tasks:
        weights = learner.adapt(task.support_x, task.support_y)
        predicted = learner.predict(weights, task.query_x).argmax(-1)
        by_hand.append((predicted == task.query_y).float().mean().item())
    result = learner.evaluate(tasks)
    assert np.allclose(result.accuracies, by_hand)
    assert np.array_equal(result.accuracies, learner.test().accuracies), "the same fixed tasks"


def test_adaptation_lowers_the_support_loss(learner):
    task = learner.episodes("test")[0]
    theta = {n: p.detach() for n, p in learner.model.named_parameters()}
    before = F.cross_entropy(learner.predict(theta, task.support_x), task.support_y)
    after = F.cross_entropy(learner.predict(learner.adapt(task.support_x, task.support_y, steps=5),
                                            task.support_x), task.support_y)
    assert after < before


def test_masks_are_the_binary_masks_with_the_reported_sparsity(learner):
    masks = learner.masks()
    params = dict(learner.model.named_parameters())
    assert list(masks) == learner.meta.inner_names and "body.block1.conv.weight" in masks
    sparsity = learner.sparsity()
    for name, mask in masks.items():
        assert mask.shape == params[name].shape and mask.device.type == "cpu"
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert sparsity[name] == pytest.approx((mask == 0).float().mean().item())


def test_prepare_accepts_pixels_of_any_size_and_image_files(learner, tmp_path):
    images = learner.dataset("test")
    raw = [images.load(0, i) for i in range(3)]  # uint8 (1, 28, 28)
    bigger = [F.interpolate(r[None].float(), size=40).round().to(torch.uint8)[0] for r in raw]
    assert learner.prepare(torch.stack(raw)).shape == (3, 1, 28, 28)
    assert learner.prepare(bigger).shape == (3, 1, 28, 28)
    paths = []
    for i, r in enumerate(raw):
        colour = np.repeat(r[0].numpy()[:, :, None], 3, axis=2)  # an RGB file of a grey image
        Image.fromarray(colour).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    assert torch.equal(learner.prepare(paths), learner.prepare(torch.stack(raw)))
    with pytest.raises(ValueError, match=r"image 0 must be uint8 pixels \(1, H, W\)"):
        learner.prepare(torch.rand(2, 1, 28, 28))


def test_clear_errors(learner, run_dir, tmp_path):
    task = learner.episodes("test")[0]
    with pytest.raises(ValueError, match="labels 0..7; the head has 5 classes"):
        learner.adapt(task.support_x, torch.tensor([0, 1, 2, 3, 7]))
    with pytest.raises(ValueError, match=r"support_x must be prepared float inputs of shape \(N, 1, 28, 28\)"):
        learner.adapt(task.support_x[:, :, :20], task.support_y)
    with pytest.raises(ConfigError, match="holds no config.yaml: is it a run folder"):
        Learner.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit the model built from the config"):
        Learner.load(run_dir, ["data.num_ways=3"])


def test_loads_a_numbered_checkpoint_and_overrides(run_dir):
    step, path = checkpoint.list_checkpoints(run_dir)[-1]
    latest = Learner.load(path, ["inner.eval_steps=4"])
    assert latest.config.inner.eval_steps == 4 and latest.checkpoint_info["state"]["step"] == step


def test_the_readme_example_runs(run_dir, tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace('"runs/my_run"', repr(str(run_dir))), "README.md", "exec"), namespace)
    assert namespace["labels"].shape == (5,)


def test_the_example_script_runs(run_dir, tmp_path):
    # PYTHONPATH as after `pip install -e .`; one thread: tiny models on a shared machine.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "api_example.py"), str(run_dir)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith("Learner(conv4, 5-way, inputs 1x28x28, mask binary_ste")
    assert re.search(r"hand-made task: \d+% of 25 query images right after 2 inner steps", out)
    assert "mask body.block1.conv.weight: shape (4, 1, 3, 3)" in out
    own = re.search(r"10 tasks: (.*)\n", out).group(1)
    cli = re.search(r"test.py's tasks: (.*)\n", out).group(1)
    assert own == cli and own.endswith("(95% CI over 10 tasks)")
