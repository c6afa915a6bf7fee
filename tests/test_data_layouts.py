"""Every dataset layout, written tiny by the test itself, read through the public API."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_maml.config import DataConfig
from sparse_maml.data import build_episodes, build_split, open_split
from fixtures import (make_miniimagenet, write_cars, write_cub, write_miniimagenet,
                                       write_omniglot, write_tieredimagenet)
from sparse_maml.data.photos import class_split

MINI_LAYOUTS = ["npy", "hdf5", "pickle", "csv", "folder"]


@pytest.fixture(scope="module")
def data_mini():
    """Tiny MiniImageNet-like images: 6/5/5 classes of 6 images, 84x84."""
    return make_miniimagenet(classes=(6, 5, 5), per_class=6)


def _config(root, name="miniimagenet", **changes) -> DataConfig:
    return dataclasses.replace(DataConfig(name=name, root=str(root), num_ways=5, num_shots=2,
                                          num_query=3), **changes)


def _episode(root, layout="auto", index=7, augment=True, split="train", name="miniimagenet"):
    cfg = _config(root, name, layout=layout)
    return build_episodes(cfg, build_split(cfg, split), seed=3, augment=augment)[index]


@pytest.mark.parametrize("layout", MINI_LAYOUTS)
def test_every_miniimagenet_layout_gives_the_same_episode(tmp_path, data_mini, layout):
    reference = _episode(write_miniimagenet(tmp_path / "npy_ref", "npy", data_mini), "npy")
    root = write_miniimagenet(tmp_path / layout, layout, data_mini)
    for forced in ("auto", layout):
        task = _episode(root, forced)
        for got, want in zip(task, reference):
            assert torch.equal(got, want)


@pytest.mark.parametrize("layout", MINI_LAYOUTS)
def test_miniimagenet_counts_and_images(tmp_path, data_mini, layout):
    root = write_miniimagenet(tmp_path, layout, data_mini)
    for split, (names, classes) in data_mini.items():
        s = open_split("miniimagenet", root, split)
        assert s.num_classes == len(names)
        assert [s.class_name(c) for c in range(s.num_classes)] == sorted(names)
        assert all(s.class_size(c) == 6 for c in range(s.num_classes))
        label = sorted(names).index(names[1])
        want = torch.from_numpy(classes[1][4][1].copy()).permute(2, 0, 1)
        assert torch.equal(s.load(label, 4), want)
        assert s.load(label, 4).dtype == torch.uint8


@pytest.mark.parametrize("val_name,bytes_keys", [("validation", True), ("val", False)])
def test_pickle_variants(tmp_path, data_mini, val_name, bytes_keys):
    root = write_miniimagenet(tmp_path, "pickle", data_mini, val_name=val_name, bytes_keys=bytes_keys)
    val = open_split("miniimagenet", root, "val")
    assert val.num_classes == 5 and val.class_name(0) == sorted(data_mini["val"][0])[0]


def test_tieredimagenet_layouts_agree(tmp_path, data_mini):
    tasks = []
    for layout in ("pickle", "hdf5"):
        root = write_tieredimagenet(tmp_path / layout, layout, data_mini)
        split = open_split("tieredimagenet", root, "val")
        assert (split.num_classes, split.class_size(0)) == (5, 6)
        assert split.class_name(2) == data_mini["val"][0][2]  # label-file order is kept
        tasks.append(_episode(root, split="val", name="tieredimagenet"))
    assert all(torch.equal(a, b) for a, b in zip(*tasks))
    # PNG is lossless: the decoded image equals the original pixels.
    want = torch.from_numpy(data_mini["val"][1][3][1][1].copy()).permute(2, 0, 1)
    assert torch.equal(split.load(3, 1), want)


def test_cub_uses_the_shipped_100_50_50_split(tmp_path):
    root = write_cub(tmp_path, per_class=2)
    sizes = {s: open_split("cub", root, s).num_classes for s in ("train", "val", "test")}
    assert sizes == {"train": 100, "val": 50, "test": 50}
    test = open_split("cub", root, "test")
    assert test.class_name(0) == class_split("cub")["test"][0] and test.normalize
    cfg = _config(root, "cub", num_ways=5, num_shots=1, num_query=1)
    task = build_episodes(cfg, test, seed=0, augment=False)[0]
    assert task.support_x.shape == (5, 3, 84, 84)  # resized from 24x24 to the native 84
    assert abs(float(task.query_x.mean())) < 3  # ImageNet-normalised, not in [0, 1]


def test_cars_split_and_bounding_box_crops(tmp_path):
    root = write_cars(tmp_path, per_class=2, size=32)
    sizes = {s: open_split("cars", root, s).num_classes for s in ("train", "val", "test")}
    assert sizes == {"train": 98, "val": 49, "test": 49}
    val = open_split("cars", root, "val")
    assert val.class_name(0) == class_split("cars")["val"][0]
    assert val.class_size(0) == 2
    image = val.load(0, 0)
    assert image.shape == (3, 16, 16)  # the box x1=y1=8, x2=y2=23 (inclusive) of a 32x32 photo
    from PIL import Image
    import numpy as np

    with Image.open(val.files[0][0]) as full:
        expected = np.asarray(full.convert("RGB"))[8:24, 8:24]
    assert torch.equal(image, torch.from_numpy(expected.copy()).permute(2, 0, 1))


@pytest.mark.parametrize("rotations", [False, True])
def test_omniglot_splits_and_rotations(tmp_path, rotations):
    root = write_omniglot(tmp_path, alphabets=3, characters=5, drawings=4)  # 30 characters
    splits = {s: open_split("omniglot", root, s, omniglot_rotations=rotations)
              for s in ("train", "val", "test")}
    factor = 4 if rotations else 1
    counts = [splits[s].num_classes // factor for s in ("train", "val", "test")]
    assert sum(counts) == 30 and counts == [19, 3, 8]  # 1028/172/423 proportions of 30
    train = splits["train"]
    image = train.load(0, 0)
    assert image.shape == (1, 105, 105) and train.channels == 1 and not train.normalize
    assert image.float().mean() < 128  # inverted: ink is bright, background dark
    if rotations:
        turned = train.load(counts[0] * 2, 0)  # same character, 180 degrees
        assert torch.equal(turned, torch.rot90(image, 2, dims=(1, 2)))
    cfg = _config(root, "omniglot", num_shots=1, num_query=1, omniglot_rotations=rotations)
    task = build_episodes(cfg, build_split(cfg, "test"), seed=0, augment=False)[0]
    assert task.support_x.shape == (5, 1, 28, 28)
