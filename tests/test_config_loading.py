"""Config loading: precedence, round trip, and errors that name the key."""

from __future__ import annotations

import re

import pytest
import yaml

from sparse_maml.config import Config, ConfigError, load_config, read_yaml
from sparse_maml.run_folder import write_config


def write(tmp_path, tree) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = write(tmp_path, {"inner": {"steps": 7, "step_size": 0.1}, "data": {"num_ways": 3}})
    config = load_config(path, ["inner.steps=9"])
    assert config.inner.steps == 9  # CLI wins over YAML
    assert config.inner.step_size == 0.1  # YAML wins over the default
    assert config.data.num_ways == 3
    assert config.outer.lr == Config().outer.lr  # untouched default


def test_values_are_typed():
    config = load_config(None, ["inner.step_size=1", "model.widths=[8,8,16,16]",
                                "outer.grad_clamp=10", "run.tensorboard=false"])
    assert isinstance(config.inner.step_size, float)
    assert config.model.widths == (8, 8, 16, 16)
    assert config.outer.grad_clamp == 10.0
    assert config.run.tensorboard is False
    assert load_config(None, ["outer.grad_clamp=null"]).outer.grad_clamp is None


def test_round_trip_through_yaml(tmp_path):
    config = load_config(None, ["inner.mask=relu_ste", "model.widths=[3,4,5,6]"])
    write_config(config, tmp_path / "config.yaml")
    assert load_config(None, base=read_yaml(tmp_path / "config.yaml")) == config


@pytest.mark.parametrize("overrides,message", [
    (["inner.stepz=3"], "unknown key inner.stepz"),
    (["innr.steps=3"], "unknown key innr"),
    (["inner.steps=three"], "inner.steps: expected int"),
    (["inner.steps=2.5"], "inner.steps: expected int"),
    (["run.tensorboard=maybe"], "run.tensorboard: expected bool"),
    (["inner.mask=binary"], "'binary_ste'"),
    (["model.arch=resnet18"], "model.arch: 'resnet18' is not allowed; choose one of 'conv4', 'resnet12'"),
    (["inner.steps"], "not of the form section.key=value"),
    (["inner=3"], "inner: expected a mapping"),
])
def test_bad_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_bad_key_in_yaml_names_file_and_key(tmp_path):
    path = write(tmp_path, {"outer": {"meta_batch": 2}})
    with pytest.raises(ConfigError, match=r"unknown key outer\.meta_batch") as err:
        load_config(path)
    assert "meta_batch_size" in str(err.value)  # the accepted keys are listed


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_generator_on_resnet12_is_refused_with_its_size():
    """One rule, by size, applied when the model is built (before any run folder exists)."""
    from sparse_maml.meta_learner import build_meta_learner

    config = load_config(None, ["model.arch=resnet12", "model.widths=[64,128,256,512]",
                                "inner.mask_generator=true"])
    with pytest.raises(ConfigError, match=r"need [\d,]+ weights \([\d.]+ GiB"):
        build_meta_learner(config, 3, 84)


def test_generator_on_conv4_of_any_width_is_accepted():
    assert load_config(None, ["model.widths=[8,16,32,64]", "inner.mask_generator=true"])
