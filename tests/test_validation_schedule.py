"""Which epochs are validated, and the per-meta-batch TensorBoard scalars."""

from __future__ import annotations

import json

import pytest

from sparse_maml.cli import train
from helpers import TINY
from sparse_maml.config import load_config
from sparse_maml.training import validates

pytestmark = pytest.mark.usefixtures("one_thread")


def validated(*overrides: str) -> list[int]:
    cfg = load_config(None, list(overrides)).train
    return [e for e in range(1, cfg.epochs + 1) if validates(cfg, e)]


def test_no_validation_before_val_from_epoch_by_default():
    """The reference's Conv4 schedule: every 5 epochs from epoch 100 of 400, not from epoch 5."""
    epochs = validated("train.epochs=400", "train.val_every=5", "train.val_from_epoch=100")
    assert epochs == list(range(100, 401, 5)) and len(epochs) == 61
    early = validated("train.epochs=400", "train.val_every=5", "train.val_from_epoch=100",
                      "train.validate_early=true")
    assert early == list(range(5, 401, 5)) and len(early) == 80


def test_last_epoch_is_validated_only_from_val_from_epoch():
    assert validated("train.epochs=7", "train.val_every=5", "train.val_from_epoch=3") == [5, 7]
    # Training ends before val_from_epoch: no validation (best.pt then holds the final weights).
    assert validated("train.epochs=7", "train.val_every=5", "train.val_from_epoch=8") == []


def test_a_run_logs_only_the_scheduled_validations_and_per_batch_tensorboard(tmp_path):
    """val records exist only from val_from_epoch; TensorBoard gets a training point per meta-batch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [o for o in TINY if not o.startswith("run.tensorboard")] + [
        "train.epochs=3", "train.val_from_epoch=2", f"run.dir={tmp_path / 'run'}"]
    run_dir = train.main(load_config(None, overrides))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [2, 3]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    steps = [e.step for e in events.Scalars("train_step/loss")]
    assert steps == list(range(1, 3 * 3 + 1))  # 3 epochs x 3 meta-batches
    assert len(events.Scalars("train_step/accuracy")) == 9
    assert len(events.Scalars("train/loss")) == 3  # the per-epoch record is still there
