"""model.arch=module:Class: a backbone of your own, imported, checked, and trained through train.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY, random_tasks, tiny_config
from sparse_maml import models
from sparse_maml.config import ConfigError
from sparse_maml.meta_learner import build_meta_learner

ROOT = Path(__file__).resolve().parents[1]

BACKBONES = textwrap.dedent('''
    import torch
    import torch.nn as nn
    from sparse_maml.models import batch_norm


    class TinyNet(nn.Module):
        """One conv block and a linear head: the smallest backbone that meets the contract."""

        def __init__(self, in_channels, num_ways, image_size):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), batch_norm(4),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
            self.head = nn.Linear(16, num_ways)

        def forward(self, x):
            return self.head(self.body(x))


    class MLP(nn.Module):
        def __init__(self, in_channels, num_ways, image_size):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 8),
                                      nn.ReLU())
            self.head = nn.Linear(8, num_ways)

        def forward(self, x):
            return self.head(self.body(x))


    class NoHead(nn.Module):
        def __init__(self, in_channels, num_ways, image_size):
            super().__init__()
            self.classifier = nn.Linear(in_channels * image_size ** 2, num_ways)

        def forward(self, x):
            return self.classifier(x.flatten(1))


    class WrongWays(MLP):
        def __init__(self, in_channels, num_ways, image_size):
            super().__init__(in_channels, num_ways + 1, image_size)


    class RunningStats(TinyNet):
        def __init__(self, in_channels, num_ways, image_size):
            super().__init__(in_channels, num_ways, image_size)
            self.body[1] = nn.BatchNorm2d(4)


    class Buffers(TinyNet):
        def __init__(self, in_channels, num_ways, image_size):
            super().__init__(in_channels, num_ways, image_size)
            self.register_buffer("scale", torch.ones(1))


    class BadForward(TinyNet):
        def forward(self, x):
            return self.body(x)


    class OldSignature(nn.Module):
        def __init__(self, channels):
            super().__init__()


    not_a_module = 3
''')


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_code")
    (folder / "my_nets.py").write_text(BACKBONES)
    return folder


def test_a_tiny_custom_backbone_trains_one_step_through_the_cli(backbones, tmp_path):
    """As a user does it: a module in their own folder, named by file, one step of train.py."""
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("train.epochs", "train.batches_per_epoch"))]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, "train.epochs=1",
         "train.batches_per_epoch=1", "model.arch=my_nets.py:TinyNet", f"run.dir={run_dir}"],
        cwd=backbones, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "my_nets.py:TinyNet with 133 weights" in result.stdout  # conv 36+4, norm 4+4, head 80+5
    assert "body.0.weight" in result.stdout and "head.weight" in result.stdout  # mask sparsity table
    # Stored with the file's absolute path: test.py started in another folder finds the code.
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["arch"]
    assert stored == f"{backbones / 'my_nets.py'}:TinyNet"
    assert (run_dir / "best.pt").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tested = subprocess.run([sys.executable, str(ROOT / "test.py"), str(run_dir), "--trust-code"],
                            cwd=elsewhere, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "synthetic/test: " in tested.stdout and "95% CI over 6 tasks" in tested.stdout


def test_an_importable_module_and_every_adaptation_rule(backbones, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(backbones))
    for adapt in ("all", "head", "body"):
        config = tiny_config("model.arch=my_nets:TinyNet", f"inner.adapt={adapt}",
                             "data.num_ways=3")
        learner = build_meta_learner(config, in_channels=1, image_size=16)
        head = [n for n in learner.inner_names if n.startswith("head.")]
        assert bool(head) == (adapt != "body") and (len(head) == len(learner.inner_names)) == (adapt == "head")
        loss, _, _ = learner(random_tasks(tasks=2, ways=3), steps=2)
        loss.backward()
        assert all(p.grad is not None for p in learner.theta_parameters())


def test_sparse_maml_plus_shapes_its_generator_from_the_backbone_or_refuses(backbones, monkeypatch,
                                                                           one_thread):
    monkeypatch.syspath_prepend(str(backbones))
    config = tiny_config("model.arch=my_nets:TinyNet", "inner.mask_generator=true", "data.num_ways=3")
    learner = build_meta_learner(config, in_channels=1, image_size=16)
    assert learner.generator.shapes == {"body.0.weight": torch.Size([4, 1, 3, 3])}
    assert learner.generator.noise_scale.numel() == 16, "noise sized by the head's input features"
    loss, _, _ = learner(random_tasks(tasks=2, ways=3), steps=2)
    loss.backward()
    assert learner.generator.logits.weight.grad is not None

    with pytest.raises(ConfigError, match=r"my_nets:MLP has no nn.Conv2d layer.*inner.mask_generator=false"):
        build_meta_learner(tiny_config("model.arch=my_nets:MLP", "inner.mask_generator=true"), 1, 16)
    size = sum(p.numel() for p in learner.generator.parameters())  # 36 * (16 + 1) + 2 * 16
    assert size == models.generator_size(learner.model) == 644
    monkeypatch.setattr(models, "GENERATOR_MAX_WEIGHTS", size - 1)
    with pytest.raises(ConfigError, match=r"refused: a dense generator would need 644 weights"):
        build_meta_learner(config, in_channels=1, image_size=16)


@pytest.mark.parametrize("arch, message", [
    (":Net", "expected module:Class"),
    ("vgg", "model.arch: 'vgg' is not allowed; choose one of 'conv4', 'resnet12' or a backbone of"),
])
def test_refused_at_config_load(backbones, monkeypatch, arch, message):
    """The form of model.arch is checked when the config is read (nothing is imported then)."""
    monkeypatch.chdir(backbones)
    with pytest.raises(ConfigError, match=message):
        tiny_config(f"model.arch={arch}")


@pytest.mark.parametrize("arch, message", [
    ("no_such_module:Net", r"importing no_such_module failed: ModuleNotFoundError.*PYTHONPATH"),
    ("missing.py:Net", r"file .*missing.py does not exist"),
    ("my_nets:Missing", "my_nets has no Missing"),
    ("my_nets:not_a_module", "not_a_module is not an nn.Module subclass"),
])
def test_refused_when_the_model_is_built(backbones, monkeypatch, arch, message):
    """The code is imported, and refused, when the model is built: before any run folder exists
    (train.py builds the experiment first)."""
    monkeypatch.syspath_prepend(str(backbones))
    monkeypatch.chdir(backbones)
    config = tiny_config(f"model.arch={arch}")
    with pytest.raises(ConfigError, match=message):
        build_meta_learner(config, in_channels=1, image_size=16)


@pytest.mark.parametrize("name, message", [
    ("NoHead", "needs a `head` attribute that is an nn.Linear"),
    ("WrongWays", "head has 4 outputs, but data.num_ways=3"),
    ("RunningStats", r"BatchNorm body.1 keeps running statistics.*track_running_stats=False"),
    ("Buffers", r"holds buffers \(scale\)"),
    ("BadForward", r"batch must give \(2, 3\) logits, got \(2, 16\)"),
    ("OldSignature", r"OldSignature\(in_channels=1, num_ways=3, image_size=16\) failed: TypeError"),
])
def test_refused_when_built_with_the_reason(backbones, monkeypatch, name, message):
    monkeypatch.chdir(backbones)
    config = tiny_config(f"model.arch=my_nets.py:{name}", "data.num_ways=3")
    with pytest.raises(ConfigError, match=message):
        build_meta_learner(config, in_channels=1, image_size=16)


def test_the_readme_backbone_builds_and_adapts(tmp_path, monkeypatch, one_thread):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Your own backbone"):]
    code = section[section.index("```python\n") + 10:section.index("```\n", section.index("```python"))]
    (tmp_path / "my_nets.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    config = tiny_config("model.arch=my_nets.py:SmallNet", "data.num_ways=3", "inner.mask_generator=true")
    learner = build_meta_learner(config, in_channels=1, image_size=16)
    loss, _, _ = learner(random_tasks(tasks=2, ways=3), steps=1)
    assert torch.isfinite(loss)
