"""pyproject.toml: the package installs with pip and imports from any folder, data files included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pip_installs_an_importable_package_with_its_data_files(tmp_path):
    pytest.importorskip("setuptools", reason="the build backend pyproject.toml names")
    source = tmp_path / "source"  # a copy: building writes egg-info and build/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "sparse_maml", source / "sparse_maml",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = ("import sparse_maml, sparse_maml.api; from sparse_maml.data.photos import class_split; "
             "print(sparse_maml.__file__); print(len(class_split('cub')['test']))")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    installed, cub_test_classes = result.stdout.split()
    assert Path(installed).is_relative_to(target) and cub_test_classes == "50"
