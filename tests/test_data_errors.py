"""The errors a user hits: missing or incomplete data, too few classes or images, corrupt files."""

from __future__ import annotations

import dataclasses

import pytest

from sparse_maml.config import DataConfig
from sparse_maml.data import DataError, build_episodes, build_split, open_split
from fixtures import (make_miniimagenet, write_cub, write_miniimagenet,
                                       write_tieredimagenet)


@pytest.fixture(scope="module")
def data_mini():
    return make_miniimagenet(classes=(6, 5, 5), per_class=6)


def _config(root, **changes) -> DataConfig:
    base = DataConfig(name="miniimagenet", root=str(root), num_ways=5, num_shots=2, num_query=3)
    return dataclasses.replace(base, **changes)


def test_missing_dataset_names_folder_layouts_files_and_command(tmp_path):
    root = tmp_path / "nothing_here"
    with pytest.raises(DataError) as err:
        build_split(_config(root), "train")
    message = str(err.value)
    assert str(root) in message
    for expected in ("npy", "hdf5", "pickle", "csv", "folder", "train_data.hdf5",
                     "mini-imagenet-cache-", "images/", "utils/prepare_data.py miniimagenet",
                     "--from-archive", "data.download=true"):
        assert expected in message


def test_incomplete_dataset_says_which_splits_exist(tmp_path, data_mini):
    write_miniimagenet(tmp_path, "pickle", {"train": data_mini["train"]})
    assert open_split("miniimagenet", tmp_path, "train").num_classes == 6
    with pytest.raises(DataError, match=r"(?s)no complete test split.*pickle has train"):
        open_split("miniimagenet", tmp_path, "test")


def test_forced_layout_is_obeyed(tmp_path, data_mini):
    write_miniimagenet(tmp_path, "pickle", data_mini)
    with pytest.raises(DataError, match="csv"):
        build_split(_config(tmp_path, layout="csv"), "train")
    with pytest.raises(DataError, match="not a miniimagenet layout"):
        build_split(_config(tmp_path, layout="lmdb"), "train")


def test_too_few_classes_fails_at_start_up_with_the_numbers(tmp_path, data_mini):
    root = write_miniimagenet(tmp_path, "npy", data_mini)
    cfg = _config(root, num_ways=6)
    with pytest.raises(DataError, match=r"5 classes, fewer than data.num_ways=6"):
        build_episodes(cfg, build_split(cfg, "val"), seed=0, augment=False)


def test_too_few_images_fails_at_start_up_with_the_numbers(tmp_path, data_mini):
    root = write_miniimagenet(tmp_path, "npy", data_mini)
    cfg = _config(root, num_shots=5, num_query=2)
    with pytest.raises(DataError, match=r"has 6 images, fewer than .* = 5 \+ 2"):
        build_episodes(cfg, build_split(cfg, "train"), seed=0, augment=False)


def test_corrupt_image_names_the_file(tmp_path, data_mini):
    root = write_miniimagenet(tmp_path, "folder", data_mini)
    split = open_split("miniimagenet", root, "val")
    bad = split.files[2][1]
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(DataError, match=str(bad)):
        split.load(2, 1)


def test_csv_listing_missing_images_names_them(tmp_path, data_mini):
    root = write_miniimagenet(tmp_path, "csv", data_mini)
    listed = (root / "train.csv").read_text().splitlines()[1].split(",")[0]
    (root / "images" / listed).unlink()
    with pytest.raises(DataError, match=r"1 images listed in .*train.csv are missing"):
        open_split("miniimagenet", root, "train")


def test_corrupt_hdf5_names_the_file(tmp_path, data_mini):
    root = write_miniimagenet(tmp_path, "hdf5", data_mini)
    path = root / "miniimagenet" / "test_data.hdf5"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=str(path)):
        open_split("miniimagenet", root, "test")


def test_truncated_pickle_names_the_file(tmp_path, data_mini):
    root = write_tieredimagenet(tmp_path, "pickle", data_mini)
    path = root / "val_images_png.pkl"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=str(path)):
        open_split("tieredimagenet", root, "val")


def test_cub_with_a_missing_class_folder(tmp_path):
    write_cub(tmp_path, per_class=1, skip_class="002.Laysan_Albatross")
    assert open_split("cub", tmp_path, "train").num_classes == 100
    with pytest.raises(DataError, match=r"002.Laysan_Albatross is missing.*prepare_data.py cub"):
        open_split("cub", tmp_path, "val")
