"""Every bad value or combination fails at load time with a message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_maml.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

BAD_CONFIGS = [
    # (overrides, a fragment of the message)
    (["run.resum=auto"], "unknown key run.resum"),
    (["train.epochs=0"], "train.epochs: must be at least 1"),
    (["train.epochs=2.5"], "train.epochs: expected int"),
    (["train.batches_per_epoch=-3"], "train.batches_per_epoch: must be at least 1"),
    (["train.val_from_epoch=-1"], "train.val_from_epoch: must not be negative"),
    (["data.num_ways=1"], "a classification task needs at least 2 ways"),
    (["data.num_shots=0"], "data.num_shots: must be at least 1"),
    (["data.num_query=0"], "data.num_query: must be at least 1"),
    (["data.num_workers=-1"], "data.num_workers must not be negative"),
    (["data.num_test_query=-1"], "data.num_test_query: must not be negative"),
    (["outer.reset_optimizer_every=-100"], "outer.reset_optimizer_every: must not be negative"),
    (["data.image_size=8"], "data.image_size: model.arch=conv4 needs at least 16 pixels"),
    (["data.name=imagenet"], "data.name: 'imagenet' is not allowed"),
    (["model.arch=vgg"], "model.arch: 'vgg' is not allowed"),
    (["model.widths=[4,4,4]"], "model.widths: expected four positive channel counts"),
    (["model.widths=[4,0,4,4]"], "model.widths: expected four positive channel counts"),
    (["inner.steps=0"], "inner.steps: must be at least 1"),
    (["inner.step_size=-0.1"], "inner.step_size: must be positive"),
    (["inner.mask=dropout"], "inner.mask: 'dropout' is not allowed"),
    (["inner.mask=none", "inner.mask_target=weight"], "need a mask function"),
    (["inner.mask=none", "inner.mask_generator=true"], "need a mask function"),
    (["inner.mask=none", "inner.mask_init_shift=0.5"], "inner.mask=none has no mask"),
    (["inner.mask=relu", "inner.mask_target=weight"], "inner.mask_target=weight needs inner.mask=binary_ste"),
    (["inner.mask_generator=true", "inner.adapt=head"], "inner.adapt=head adapts none"),
    (["inner.mask_generator=true", "inner.mask_target=weight"], "mask_target=gradient only"),
    (["outer.meta_batch_size=0"], "outer.meta_batch_size: must be at least 1"),
    (["outer.lr=0"], "outer.lr: must be positive"),
    (["outer.mask_lr=-1"], "outer.mask_lr: must be positive"),
    (["outer.lr=.nan"], "outer.lr: must be finite"),
    (["outer.momentum=1.0"], "outer.momentum: must be in [0, 1)"),
    (["outer.grad_clamp=0"], "outer.grad_clamp: must be positive or null"),
    (["outer.optimizer=rmsprop"], "outer.optimizer: 'rmsprop' is not allowed"),
    (["outer.max_bad_steps=0"], "outer.max_bad_steps: must be at least 1"),
    (["run.device=gpu"], "run.device: expected auto, cpu, cuda or cuda:<index>"),
    (["run.device=cuda:first"], "run.device: expected auto, cpu, cuda or cuda:<index>"),
    (["run.seed=-1"], "run.seed: must be in [0, 2**63)"),
    (["run.name=a/b"], "run.name: expected a non-empty name without path separators"),
    (["run.out_dir="], "run.out_dir: must not be empty"),
    (["run.keep_checkpoints=0"], "run.keep_checkpoints: must be at least 1"),
    (["run.checkpoint_every=-5"], "run.checkpoint_every: must not be negative"),
    (["run.resume=always"], "run.resume: 'always' is not allowed; choose one of 'never', 'auto'"),
    (["run.resume=auto"], "run.resume=auto needs run.dir"),
    (["run.resume=auto", "run.dir=runs/x", "run.overwrite=true"], "contradict each other"),
]


def test_defaults_are_valid():
    config = load_config()
    assert config.run.resume == "never" and config.run.keep_checkpoints >= 1
    assert config.outer.max_bad_steps >= 1


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_is_refused_with_its_message(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_bad_config_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("outer:\n  max_bad_steps: 0\n")
    with pytest.raises(ConfigError, match="outer.max_bad_steps: must be at least 1"):
        load_config(path)


def test_more_ways_than_classes_fails_at_start_up_through_train_py(tmp_path):
    """1-shot with more ways than the validation split has classes: DataError, no run folder."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"run.dir={run_dir}", "data.num_ways=200",
         "data.num_shots=1", "run.progress=false", "run.tensorboard=false"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 1
    assert "error: synthetic/val has 160 classes, fewer than" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()
