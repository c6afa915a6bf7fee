"""data.name=folder: your own root/{train,val,test}/<class>/<images>, of any size and mode."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY
from sparse_maml.config import ConfigError, DataConfig, load_config
from sparse_maml.data import DataError, build_episodes, build_split
from sparse_maml.data import normalization
from sparse_maml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize

ROOT = Path(__file__).resolve().parents[1]
MODES = ("RGB", "L", "RGBA", "P", "I;16")


def _save(path, rng, mode: str, side: int) -> None:
    pixels = rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)  # not square on purpose
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257)  # 16-bit grey
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)


def write_dataset(root, classes=(6, 5, 5), per_class=5, seed=0):
    """A folder dataset of PNG/JPEG files of mixed sizes and modes, with hidden entries mixed in."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val", "test"), classes):
        for c in range(count):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                mode = MODES[(c + i) % len(MODES)]
                suffix = ".jpg" if mode == "RGB" and i % 2 else ".png"
                _save(folder / f"{i}{suffix}", rng, mode, int(rng.integers(10, 40)))
            (folder / "notes.txt").write_text("not an image")
            (folder / ".hidden.png").write_bytes(b"not decoded: hidden")
        hidden = root / split / ".ipynb_checkpoints"
        hidden.mkdir()
        for i in range(per_class):
            _save(hidden / f"{i}.png", rng, "RGB", 12)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("folder"))


def folder_config(root, **changes) -> DataConfig:
    base = DataConfig(name="folder", root=str(root), image_size=16, num_ways=3, num_shots=2,
                      num_query=2)
    return dataclasses.replace(base, **changes)


def test_classes_are_the_visible_folders_and_images_any_size_and_mode(root):
    split = build_split(folder_config(root, normalize="none"), "train")
    assert split.num_classes == 6, "hidden folders such as .ipynb_checkpoints are not classes"
    assert [split.class_name(c) for c in range(6)] == [f"class_{c}" for c in range(6)]
    assert all(split.class_size(c) == 5 for c in range(6)), "only image files count, hidden skipped"
    for index in range(5):  # every mode decodes to RGB
        image = split.load(0, index)
        assert image.dtype == torch.uint8 and image.shape[0] == 3
    grey = build_split(folder_config(root, grayscale=True, normalize="none"), "train")
    assert grey.channels == 1 and grey.load(1, 2).shape[0] == 1
    episodes = build_episodes(folder_config(root, grayscale=True, normalize="none"), grey, 0, False)
    task = episodes[3]
    assert task.support_x.shape == (6, 1, 16, 16) and task.query_x.shape == (6, 1, 16, 16)
    assert 0 <= task.support_x.min() and task.support_x.max() <= 1


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "deep"
    pixels = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0..65535
    for split in ("train", "val", "test"):
        for c in range(3):
            (root / split / str(c)).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(pixels).save(root / split / str(c) / f"{i}.png")
    image = build_split(folder_config(root, normalize="none", grayscale=True), "val").load(0, 0)
    assert torch.equal(image[0], torch.arange(256, dtype=torch.uint8).view(16, 16))


def _manual_statistics(root, size):
    """Per-channel mean/std of the train images as the network sees them, computed directly."""
    values = []
    for path in sorted((root / "train").glob("class_*/*")):
        if path.suffix in (".png", ".jpg") and not path.name.startswith("."):
            with Image.open(path) as image:
                if image.mode.startswith("I"):  # 16-bit grey: scaled to 8 bits
                    image = Image.fromarray(np.round(np.asarray(image) / 257).astype(np.uint8))
                array = np.asarray(image.convert("RGB"))
            x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255
            values.append(resize(x, size)[0].flatten(1).double())
    pixels = torch.cat(values, 1)
    return pixels.mean(1), pixels.std(1, unbiased=False)


def test_train_statistics_computed_once_recorded_and_used_for_every_split(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "data")
    config = folder_config(root, normalize="train")
    val = build_split(config, "val")
    mean, std = _manual_statistics(root, 16)
    assert np.allclose(val.mean, mean.numpy(), atol=1e-9) and np.allclose(val.std, std.numpy(), atol=1e-9)
    record = json.loads((root / normalization.STATISTICS_FILE).read_text())
    assert record["3x16"]["num_images"] == 30 and np.allclose(record["3x16"]["mean"], val.mean)

    def no_recompute(*args):
        raise AssertionError("statistics recomputed although recorded")

    monkeypatch.setattr(normalization, "compute_statistics", no_recompute)
    train = build_split(config, "train")
    assert train.mean == val.mean and train.std == val.std
    # Train inputs, normalised, have per-channel mean 0 and std 1 (over whole images, no augment).
    images = torch.stack([build_episodes(config, train, 0, False).transform.apply(train.load(c, i), None)
                          for c in range(6) for i in range(5)])
    assert images.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (images.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4
    monkeypatch.undo()

    # Another size is another record; a changed train split is computed again.
    other = build_split(folder_config(root, normalize="train", image_size=20), "train")
    assert other.mean != val.mean
    _save(root / "train" / "class_0" / "extra.png", np.random.default_rng(5), "RGB", 30)
    changed = build_split(config, "test")
    assert changed.mean != val.mean
    assert set(json.loads((root / normalization.STATISTICS_FILE).read_text())) == {"3x16", "3x20"}


def test_normalize_choices(root):
    assert build_split(folder_config(root), "val").normalize, "auto for folder: train statistics"
    none = build_split(folder_config(root, normalize="none"), "val")
    imagenet = build_split(folder_config(root, normalize="imagenet"), "val")
    assert not none.normalize
    assert imagenet.normalize and (imagenet.mean, imagenet.std) == (IMAGENET_MEAN, IMAGENET_STD)
    grey = build_split(folder_config(root, grayscale=True), "val")
    assert len(grey.mean) == len(grey.std) == 1
    # The built-in datasets keep their usual normalisation unless asked otherwise.
    assert not build_split(DataConfig(), "val").normalize
    with pytest.raises(DataError, match="imagenet needs colour images"):
        build_split(DataConfig(normalize="imagenet"), "val")


def test_episodes_are_seeded_and_the_on_device_path_gives_the_same(root):
    config = folder_config(root, normalize="train")
    split = build_split(config, "train")
    a, b = build_episodes(config, split, 7, augment=True), build_episodes(config, split, 7, augment=True)
    assert torch.equal(a[11].support_x, b[11].support_x) and torch.equal(a[11].query_x, b[11].query_x)
    assert not torch.equal(a[11].support_x, a[12].support_x)
    device = build_episodes(dataclasses.replace(config, on_device=True), split, 7, augment=False,
                            device="cpu")
    lazy = build_episodes(config, split, 7, augment=False)
    for index in (0, 5):
        # The device path resizes once to uint8, the lazy path per episode in float: within rounding.
        assert torch.allclose(device[index].support_x, lazy[index].support_x, atol=0.02 / min(split.std))


def test_clear_errors(tmp_path, root):
    with pytest.raises(DataError, match="is not a folder"):
        build_split(folder_config(tmp_path / "nowhere"), "train")
    partial = tmp_path / "partial"
    (partial / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"val split folder .* is missing \(found: train"):
        build_split(folder_config(partial), "val")
    (partial / "val").mkdir()
    with pytest.raises(DataError, match="holds no class folders"):
        build_split(folder_config(partial), "val")
    with pytest.raises(DataError, match=r"class folder .*a holds no image files"):
        build_split(folder_config(partial, normalize="none"), "train")
    config = folder_config(root, num_shots=4, num_query=2, normalize="none")
    with pytest.raises(DataError, match=r"folder/val: class 0 \(class_0\) has 5 images, fewer than"):
        build_episodes(config, build_split(config, "val"), 0, False)
    with pytest.raises(DataError, match="fewer than data.num_ways=6"):
        cfg = folder_config(root, num_ways=6, normalize="none")
        build_episodes(cfg, build_split(cfg, "val"), 0, False)

    corrupt = write_dataset(tmp_path / "corrupt", classes=(3, 3, 3), per_class=4)
    (corrupt / "train" / "class_1" / "2.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"class_1/2.png is corrupt or not an image"):
        build_split(folder_config(corrupt), "train")  # found while computing the statistics
    config = folder_config(corrupt, normalize="none", num_shots=3, num_query=1)
    episodes = build_episodes(config, build_split(config, "train"), 0, False)
    with pytest.raises(DataError, match=r"class_1/2.png is corrupt or not an image"):
        episodes[0]


@pytest.mark.parametrize("overrides, message", [
    (["data.name=folder"], "data.image_size: data.name=folder needs"),
    (["data.name=folder", "data.image_size=32", "data.download=true"], "nothing to download"),
    (["data.name=folder", "data.image_size=32", "data.grayscale=true", "data.normalize=imagenet"],
     "imagenet needs colour images"),
    (["data.grayscale=true"], "data.grayscale: only data.name=folder"),
    (["data.normalize=train"], "data.normalize=train: only data.name=folder"),
    (["data.normalize=mine"], "data.normalize: 'mine' is not allowed"),
])
def test_config_errors_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_train_and_test_on_a_generated_folder_dataset_through_the_cli(tmp_path):
    """As the README shows it: write a folder dataset with the example script, train, test."""
    # PYTHONPATH as after `pip install -e .`; one thread: tiny models on a shared machine.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    made = subprocess.run([sys.executable, str(ROOT / "examples" / "make_folder_dataset.py"),
                           str(tmp_path / "glyphs"), "--classes", "6", "5", "5", "--per-class", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, "data.name=folder",
         f"data.root={tmp_path / 'glyphs'}", "data.image_size=16", "data.num_query=1",
         "train.epochs=1", f"run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "data: folder, 5-way 1-shot, 1 queries per class" in train.stdout
    assert re.search(r"test accuracy \(folder, 6 tasks.*\): [\d.]+% \+- [\d.]+%", train.stdout)
    statistics = json.loads((tmp_path / "glyphs" / normalization.STATISTICS_FILE).read_text())
    assert statistics["3x16"]["num_images"] == 24, "6 train classes x 4, .ipynb_checkpoints ignored"
    test = subprocess.run([sys.executable, str(ROOT / "test.py"), str(run_dir), "--split", "val"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert test.returncode == 0, test.stderr[-3000:]
    assert re.search(r"folder/val: [\d.]+% \+- [\d.]+% \(95% CI over 6 tasks", test.stdout)


def test_a_missing_split_is_found_before_training(tmp_path):
    """train.py checks every split it will need up front: for a folder dataset, by listing it."""
    from sparse_maml.data import check_present

    write_dataset(tmp_path / "data")
    config = folder_config(tmp_path / "data")
    check_present(config, "test")
    (tmp_path / "data" / "test").rename(tmp_path / "data" / "elsewhere")
    with pytest.raises(DataError, match="test split folder"):
        check_present(config, "test")
