"""Every choice the config offers is a registry entry, and every registry entry a choice: the
config's Literal types, the registries and the benchmark's rows agree."""

from __future__ import annotations

import typing

import benchmark
from sparse_maml import data
from sparse_maml.config import BUILTIN_ARCHS, DataConfig, InnerConfig, OuterConfig
from sparse_maml.experiment import OPTIMIZERS
from sparse_maml.masks import MASK_FUNCTIONS, MASK_INITS
from sparse_maml.meta_learner import IMPLEMENTATIONS
from sparse_maml.models import MODELS


def choices(section: type, name: str) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(section)[name]))


def test_the_configs_choices_are_the_registries():
    assert choices(OuterConfig, "implementation") == set(IMPLEMENTATIONS)
    assert choices(OuterConfig, "optimizer") == choices(OuterConfig, "mask_optimizer") == set(OPTIMIZERS)
    assert choices(InnerConfig, "mask") == {"none", *MASK_FUNCTIONS}
    assert choices(InnerConfig, "mask_init") == set(MASK_INITS)
    assert set(BUILTIN_ARCHS) == set(MODELS)
    # synthetic and folder are built in data/__init__.py; every other name has its layouts
    assert choices(DataConfig, "name") == {"synthetic", "folder", *data.DATASETS}


def test_the_benchmark_has_a_row_for_every_implementation():
    assert benchmark.FIRST_ORDER == tuple(IMPLEMENTATIONS)
    assert all(benchmark.IMPLEMENTATIONS[name] == [f"outer.implementation={name}"]
               for name in IMPLEMENTATIONS)
