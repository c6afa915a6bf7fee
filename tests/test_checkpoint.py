"""Checkpoint files: atomic writes, named errors for damaged files, fallback, pruning."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparse_maml import checkpoint
from sparse_maml.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def payload(value: float, size: int = 1000) -> dict:
    return {"learner": {"w": torch.full((size,), value)}, "step": int(value)}


def save_step(run_dir: Path, step: int, size: int = 1000) -> Path:
    path = run_dir / checkpoint.checkpoint_name(step)
    checkpoint.save_atomic(payload(float(step), size), path)
    return path


def test_round_trip_and_numbering(tmp_path):
    paths = [save_step(tmp_path, s) for s in (3, 12, 100)]
    assert checkpoint.list_checkpoints(tmp_path) == list(zip((3, 12, 100), paths))
    assert torch.equal(checkpoint.load(paths[1])["learner"]["w"], torch.full((1000,), 12.0))


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = save_step(tmp_path, 5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is truncated"):
        checkpoint.load(path)


def test_bit_flip_is_caught_by_the_crc_check(tmp_path):
    """torch.load alone would return the damaged tensor; the CRC check refuses it."""
    path = save_step(tmp_path, 5, size=100_000)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt"):
        checkpoint.load(path)


def test_foreign_and_missing_files_name_the_file(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(CheckpointError, match=f"{foreign} is not a sparse_maml checkpoint"):
        checkpoint.load(foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=str(text)):
        checkpoint.load(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nothing.pt")


def test_save_that_fails_part_way_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.BEST
    checkpoint.save_atomic(payload(1.0), path)

    def half_then_crash(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic(payload(2.0), path)
    assert checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.BEST]  # no temporary left


def test_writer_killed_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    """SIGKILL a process while it writes checkpoint 2: checkpoint 1 still loads and is chosen."""
    save_step(tmp_path, 1)
    script = (
        "import sys, time, torch\n"
        "from pathlib import Path\n"
        "from sparse_maml import checkpoint\n"
        "real_save = torch.save\n"
        "def slow_save(obj, f):\n"
        "    f.write(b'PK\\x03\\x04' + b'x' * 4096)\n"
        "    f.flush()\n"
        "    time.sleep(60)\n"
        "    real_save(obj, f)\n"
        "checkpoint.torch.save = slow_save\n"
        "checkpoint.save_atomic({'learner': {}}, Path(sys.argv[2]) / checkpoint.checkpoint_name(2))\n")
    writer = subprocess.Popen([sys.executable, "-c", script, "", str(tmp_path)])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".*.tmp")) or list(tmp_path.glob(".*.tmp"))[0].stat().st_size == 0:
        assert writer.poll() is None and time.time() < deadline, "writer did not start its save"
        time.sleep(0.01)
    writer.kill()
    writer.wait(timeout=30)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [1]
    found = checkpoint.load_latest(tmp_path, report=lambda message: None)
    assert found is not None and found[1]["step"] == 1
    assert checkpoint.remove_stale_temporaries(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_latest_falls_back_past_a_corrupt_checkpoint_and_says_so(tmp_path):
    save_step(tmp_path, 4)
    newest = save_step(tmp_path, 8)
    newest.write_bytes(newest.read_bytes()[:100])
    messages = []
    path, state = checkpoint.load_latest(tmp_path, report=messages.append)
    assert path.name == checkpoint.checkpoint_name(4) and state["step"] == 4
    assert len(messages) == 1 and str(newest) in messages[0]


def test_load_latest_with_every_checkpoint_corrupt_lists_them(tmp_path):
    paths = [save_step(tmp_path, s) for s in (4, 8)]
    for path in paths:
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_latest(tmp_path, report=lambda message: None)
    assert all(str(p) in str(err.value) for p in paths)
    assert checkpoint.load_latest(tmp_path / "empty", report=print) is None


def test_prune_keeps_the_newest_k_and_best(tmp_path):
    for step in (1, 2, 10, 11):
        save_step(tmp_path, step)
    checkpoint.save_atomic(payload(0.0), tmp_path / checkpoint.BEST)
    checkpoint.prune(tmp_path, keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [10, 11]
    assert (tmp_path / checkpoint.BEST).is_file()
