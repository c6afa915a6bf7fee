"""Seeded episodes: reproducible across worker counts, identical on the on-device path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import tiny_config
from sparse_maml import evaluation
from sparse_maml.config import DataConfig
from sparse_maml.data import (DeviceEpisodeDataset, EpisodeDataset, build_episodes, build_split,
                              episode_loader)
from fixtures import make_miniimagenet, write_miniimagenet
from sparse_maml.experiment import build_experiment


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny MiniImageNet in the CSV layout (JPEG files decoded per episode)."""
    root = tmp_path_factory.mktemp("mini")
    return write_miniimagenet(root, "csv", make_miniimagenet(classes=(7, 5, 5), per_class=6))


def _config(root, **changes) -> DataConfig:
    base = DataConfig(name="miniimagenet", root=str(root), num_ways=5, num_shots=2, num_query=3)
    return dataclasses.replace(base, **changes)


def _batches(loader) -> list:
    return [t for t in loader]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_same_triple_same_task_and_different_index_differs(data_root):
    cfg = _config(data_root)
    split = build_split(cfg, "train")
    a = build_episodes(cfg, split, seed=1, augment=True)
    b = build_episodes(cfg, build_split(cfg, "train"), seed=1, augment=True)
    assert _same(a[5], b[5])
    assert not torch.equal(a[5].support_x, a[6].support_x)
    assert not torch.equal(a[5].support_x, build_episodes(cfg, split, 2, True)[5].support_x)
    task = a[5]
    assert task.support_x.shape == (10, 3, 84, 84) and task.query_x.shape == (15, 3, 84, 84)
    assert task.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert task.query_y.tolist() == sum([[k] * 3 for k in range(5)], [])


def test_episodes_do_not_depend_on_worker_count(data_root):
    cfg = _config(data_root)
    episodes = build_episodes(cfg, build_split(cfg, "val"), seed=0, augment=True)
    serial = _batches(episode_loader(episodes, 10, 6, 3, num_workers=0))
    parallel = _batches(episode_loader(episodes, 10, 6, 3, num_workers=2))
    assert len(serial) == len(parallel) == 2
    for a, b in zip(serial, parallel):
        assert a.support_x.shape == (3, 10, 3, 84, 84)
        assert _same(a, b)
    assert _same(serial[1].select(0), episodes[13])  # batch 1 starts at index 10 + 3


@pytest.mark.parametrize("augment", [False, True])
def test_on_device_mode_gives_the_same_episodes(data_root, augment):
    cfg = _config(data_root)
    split = build_split(cfg, "train")
    lazy = build_episodes(cfg, split, seed=4, augment=augment)
    device = build_episodes(dataclasses.replace(cfg, on_device=True), split, seed=4, augment=augment,
                            device="cpu")
    assert isinstance(device, DeviceEpisodeDataset) and not isinstance(lazy, DeviceEpisodeDataset)
    assert device.images.dtype == torch.uint8 and device.images.shape == (42, 3, 84, 84)
    batches = _batches(episode_loader(device, 0, 4, 2, num_workers=2, pin_memory=True))
    assert len(batches) == 2
    for b, batch in enumerate(batches):
        for t in range(2):
            want, got = lazy[2 * b + t], batch.select(t)
            for x, y in zip(got, want):
                assert x.shape == y.shape
                assert torch.allclose(x.float(), y.float(), atol=1e-5)


def test_on_device_resizes_once_to_the_configured_size(data_root):
    cfg = _config(data_root, image_size=32, on_device=True)
    episodes = build_episodes(cfg, build_split(cfg, "test"), seed=0, augment=False, device="cpu")
    assert episodes.images.shape == (30, 3, 32, 32)
    lazy = build_episodes(dataclasses.replace(cfg, on_device=False), build_split(cfg, "test"), 0, False)
    a, b = episodes[3], lazy[3]
    assert torch.equal(a.support_y, b.support_y)
    # Rounded to uint8 after the resize: within one grey level (ImageNet std ~ 0.22).
    assert (a.support_x - b.support_x).abs().max() < 1.5 / 255 / 0.224


def test_synthetic_data_still_works():
    cfg = DataConfig(num_ways=3, num_shots=1, num_query=2)
    episodes = build_episodes(cfg, build_split(cfg, "train"), seed=0, augment=False)
    assert isinstance(episodes, EpisodeDataset)
    assert episodes[0].support_x.shape == (3, 1, 28, 28)


def test_hdf5_files_reopen_in_worker_processes(tmp_path):
    root = write_miniimagenet(tmp_path, "hdf5", make_miniimagenet(classes=(5, 5, 5), per_class=5))
    cfg = _config(root, num_shots=1, num_query=2)
    split = build_split(cfg, "test")
    split.load(0, 0)  # the parent holds an open handle before the workers fork
    episodes = build_episodes(cfg, split, seed=0, augment=False)
    serial = _batches(episode_loader(episodes, 0, 4, 2, num_workers=0))
    parallel = _batches(episode_loader(episodes, 0, 4, 2, num_workers=2))
    assert all(_same(a, b) for a, b in zip(serial, parallel))


def test_test_tasks_take_data_num_test_query_and_validation_keeps_num_query(monkeypatch):
    """data.num_test_query=1 (Finn et al.'s 1-shot test: K queries per class) reaches the episodes
    test.py scores; training and validation episodes keep data.num_query; 0 means num_query."""
    config = tiny_config("data.num_ways=2", "data.num_query=3", "data.num_test_query=1",
                         "run.device=cpu")
    exp = build_experiment(config)
    assert exp.val_episodes[0].query_x.shape[0] == exp.train_episodes[0].query_x.shape[0] == 2 * 3
    scored = []
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda learner, episodes, *args, **kwargs: scored.append(episodes) or [1.0])
    evaluation.evaluate_split(exp.learner, config, build_split(config.data, "test"), exp.device)
    assert scored[0][0].query_x.shape[0] == 2 * 1 and scored[0][0].support_x.shape[0] == 2 * 1
    assert dataclasses.replace(config.data, num_test_query=0).test_query == 3
