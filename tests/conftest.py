"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SMALLEST


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: extra intra-op threads only oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished SMALLEST run (config, metrics, checkpoint, best.pt); tests copy it to change it."""
    from sparse_maml.cli import train

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train.cli([*SMALLEST, f"run.dir={run_dir}"]) == 0
    return run_dir
