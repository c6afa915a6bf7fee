"""Runs that survive: kill-and-resume equality, the NaN guard, signals and run-folder rules.

metrics.jsonl is compared with the wall-clock `seconds` field removed: it is the one value a
resumed run cannot reproduce. Everything else, and every weight, must be bit-identical on CPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparse_maml import checkpoint
from sparse_maml.config import ConfigError, load_config
from sparse_maml.cli.train import EXIT_DIVERGED, EXIT_STOPPED
from sparse_maml.experiment import build_experiment
from sparse_maml.run_folder import make_run_dir, read_metrics
from sparse_maml.run_log import RunLog
from sparse_maml.training import TrainingDiverged, TrainingStopped, fit, snapshot

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.widths=[4,4,4,4]", "data.num_ways=2", "data.num_shots=1", "data.num_query=1",
        "train.num_val_tasks=4", "train.num_test_tasks=4", "train.eval_batch_size=4", "inner.steps=1", "inner.eval_steps=1",
        "outer.meta_batch_size=2", "run.tensorboard=false", "run.progress=false",
        "run.deterministic=true", "run.device=cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


def without_time(records: list[dict]) -> list[dict]:
    """Metrics records minus the wall-clock field a resumed run cannot reproduce."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    _, path = checkpoint.list_checkpoints(run_dir)[-1]
    return checkpoint.load(path)["learner"]


def assert_same_run(a: Path, b: Path) -> None:
    assert without_time(read_metrics(a)) == without_time(read_metrics(b))
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    best_a, best_b = checkpoint.load(a / checkpoint.BEST), checkpoint.load(b / checkpoint.BEST)
    for name in best_a["learner"]:
        assert torch.equal(best_a["learner"][name], best_b["learner"][name]), name


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early:\n{proc.communicate()[0]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("train.py did not reach the expected point in time")
        time.sleep(0.01)


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    """SIGTERM mid-epoch -> exit 3 with a checkpoint; --resume -> same metrics and weights."""
    args = [*TINY, "train.epochs=2", "train.batches_per_epoch=12", "train.val_every=1",
            "run.checkpoint_every=3", "run.keep_checkpoints=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    reference = subprocess.Popen(train_cmd(*args, f"run.dir={full}"), env=ENV, cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(train_cmd(*args, f"run.dir={cut}"), env=ENV, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The first periodic checkpoint (step 3) shows the run is in the middle of epoch 1.
    wait_for(lambda: any(checkpoint.list_checkpoints(cut)), victim)
    victim.send_signal(signal.SIGTERM)
    out, _ = victim.communicate(timeout=120)
    assert victim.returncode == EXIT_STOPPED, out
    assert "resume with: python train.py --resume" in out
    stopped_at = checkpoint.list_checkpoints(cut)[-1][0]
    assert 3 <= stopped_at < 24, out
    assert f"stopped at step {stopped_at} (epoch {(stopped_at - 1) // 12 + 1})" in out  # mid-epoch
    print(f"SIGTERM stopped the run after meta-batch {stopped_at} of 24")
    resumed = subprocess.run(train_cmd("--resume", str(cut)), env=ENV, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{stopped_at} meta-batches done" in resumed.stdout
    out, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, out
    assert_same_run(full, cut)
    assert [s for s, _ in checkpoint.list_checkpoints(cut)][-1] == 24
    assert len(checkpoint.list_checkpoints(cut)) <= 3


def _tiny_config(run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"run.dir={run_dir}", "train.epochs=2",
                              "train.batches_per_epoch=4", *extra])


def _stopped_run(cut: Path, stop_step: int, *extra: str) -> Path:
    """A new run of _tiny_config(cut, *extra) that fit() stops after `stop_step` meta-batches."""
    config = _tiny_config(cut, *extra)
    exp = build_experiment(config)
    make_run_dir(config, cut)
    log = RunLog(cut, tensorboard=False)
    with pytest.raises(TrainingStopped):
        fit(exp, cut, log, should_stop=lambda: exp.state.step == stop_step)
    log.close()
    return cut


@pytest.fixture(scope="module")
def generator_reference(tmp_path_factory) -> Path:
    """An uninterrupted tiny sparse-MAML+ run (its generator draws from torch's global RNG)."""
    from sparse_maml.cli import train

    return train.main(_tiny_config(tmp_path_factory.mktemp("reference") / "run",
                                   "inner.mask_generator=true"))


@pytest.mark.parametrize("stop_step", [3, 4], ids=["mid-epoch", "before-epoch-end"])
def test_in_process_stop_and_resume_is_exact(tmp_path, generator_reference, stop_step):
    """fit() stopped after `stop_step` meta-batches (4 per epoch) and continued equals the
    uninterrupted run, RNG-consuming mask generator included."""
    from sparse_maml.cli import train

    cut = _stopped_run(tmp_path / "cut", stop_step, "inner.mask_generator=true")
    assert checkpoint.list_checkpoints(cut)[-1][0] == stop_step
    assert not (cut / "metrics.jsonl").exists()  # stopped before the epoch's train record
    train.main(*train.load_run_config(None, [], str(cut)))
    assert_same_run(generator_reference, cut)


def test_extending_a_finished_run_from_its_epoch_end_checkpoint_is_exact(tmp_path):
    """A 1-epoch run continued with train.epochs=2 equals the 2-epoch run (sparse-MAML+: the
    generator's RNG state must be restored before the next epoch's loader starts)."""
    from sparse_maml.cli import train

    def config(run_dir: Path, epochs: int):
        # Validating every epoch: the last epoch of the 1-epoch run is validated either way.
        return load_config(None, [*TINY, f"run.dir={run_dir}", f"train.epochs={epochs}",
                                  "train.batches_per_epoch=4", "train.val_every=1",
                                  "inner.mask_generator=true"])

    reference, cut = tmp_path / "reference", tmp_path / "cut"
    train.main(config(reference, 2))
    train.main(config(cut, 1))
    train.main(*train.load_run_config(None, ["train.epochs=2"], str(cut)))
    assert_same_run(reference, cut)


def test_injected_nan_is_skipped_counted_then_stops_the_run(tmp_path, monkeypatch, capsys):
    """Non-finite losses skip the update and are counted; max_bad_steps in a row stop the run."""
    config = _tiny_config(tmp_path / "run", "outer.max_bad_steps=3", "train.epochs=3",
                          "run.checkpoint_every=5", "run.keep_checkpoints=5")
    exp = build_experiment(config)
    run_dir = make_run_dir(config)
    forward = type(exp.learner).forward
    bad_steps = {2, 3} | set(range(6, 100))  # 1-based meta-batches whose loss becomes NaN

    before_5 = {}

    def poisoned(self, batch, steps, track_outer=True, share=None):
        if track_outer and exp.state.step == 4:
            before_5.update(snapshot(exp))
        loss, losses, accs = forward(self, batch, steps, track_outer, share)
        if track_outer and exp.state.step + 1 in bad_steps:
            loss = loss * float("nan")
        return loss, losses, accs

    monkeypatch.setattr(type(exp.learner), "forward", poisoned)
    log = RunLog(run_dir, tensorboard=False)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive meta-batches \(up to step 8\) were "
                                               r"skipped, the last for a non-finite outer loss "
                                               r"\(nan\)") as err:
        fit(exp, run_dir, log)
    log.close()
    records = read_metrics(run_dir)
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in train_records] == [2]  # epoch 1: steps 2 and 3
    assert records[-1]["kind"] == "diverged" and records[-1]["skipped_steps"] == 5
    assert exp.state.skipped_steps == 5 and exp.state.bad_streak == 3
    saved = checkpoint.load(err.value.checkpoint_path)
    assert saved["state"]["step"] == 8
    # Steps 6..8 had no finite loss, so the weights step 5 produced are not known to be good: the
    # stop checkpoint holds the state step 5 started from, the last that gave a finite loss.
    assert all(torch.equal(v, saved["learner"][k]) for k, v in before_5["learner"].items())
    assert [str(o["state"]) for o in before_5["optimizers"]] == [
        str(saved["theta_optimizer"]["state"]), str(saved["mask_optimizer"]["state"])]
    after_5 = checkpoint.load(run_dir / checkpoint.checkpoint_name(5))
    assert not all(torch.equal(v, saved["learner"][k]) for k, v in after_5["learner"].items())
    assert "non-finite outer loss (nan); update skipped (3 in a row)" in capsys.readouterr().out


def test_nan_guard_exit_status_through_train_py(tmp_path):
    """A run whose outer loss is always NaN exits with status 4 and a clear message."""
    run_dir = tmp_path / "nan"
    result = subprocess.run(
        train_cmd(*TINY, f"run.dir={run_dir}", "train.epochs=1", "train.batches_per_epoch=4",
                  "outer.max_bad_steps=2", "inner.step_size=1.0e+38", "inner.mask=none",
                  "inner.first_order=false"),
        env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    if result.returncode == 0:
        pytest.skip("this step size did not overflow on this machine")
    assert result.returncode == EXIT_DIVERGED, result.stdout + result.stderr
    assert "consecutive meta-batches" in result.stderr and "outer.max_bad_steps=2" in result.stderr
    assert checkpoint.list_checkpoints(run_dir)


def test_second_signal_exits_at_once(tmp_path):
    """The first SIGTERM only sets the flag; the second kills the process by that signal."""
    script = ("import os, signal, sys, time\n"
              "from sparse_maml.cli.train import StopSignal\n"
              "with StopSignal() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.1)\n"
              "    print('first', stop(), flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(5)\n"
              "    print('survived', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip() == "first True"
    assert result.returncode == -signal.SIGTERM


def test_used_run_folder_is_refused_then_resume_auto_continues(tmp_path, capsys):
    """A folder holding a run is not overwritten; run.resume=auto continues it (extending epochs)."""
    from sparse_maml.cli import train

    run_dir = tmp_path / "run"
    base = [*TINY, f"run.dir={run_dir}", "train.batches_per_epoch=4"]
    train.main(*train.load_run_config(None, [*base, "train.epochs=1"]))
    with pytest.raises(FileExistsError, match="already holds a run"):
        train.main(*train.load_run_config(None, [*base, "train.epochs=1"]))
    capsys.readouterr()
    train.main(*train.load_run_config(None, [*base, "train.epochs=2", "run.resume=auto"]))
    assert "resume: train.epochs: 1 -> 2" in capsys.readouterr().out
    epochs = [r["epoch"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert epochs == [1, 2]
    assert load_config(run_dir / "config.yaml").train.epochs == 2
    train.main(*train.load_run_config(None, [*base, "train.epochs=1", "run.overwrite=true"]))
    assert [r["epoch"] for r in read_metrics(run_dir) if r["kind"] == "train"] == [1]
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir)] == [4]


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, capsys):
    """Damage the newest checkpoint of a finished run: resume warns, names it, uses the older one,
    and replays to the same records and weights."""
    from sparse_maml.cli import train

    run_dir = train.main(_tiny_config(tmp_path / "run", "train.epochs=1", "run.checkpoint_every=2"))
    expected, weights = without_time(read_metrics(run_dir)), final_weights(run_dir)
    newest = checkpoint.list_checkpoints(run_dir)[-1][1]
    newest.write_bytes(newest.read_bytes()[:-200])
    capsys.readouterr()
    train.main(*train.load_run_config(None, [], str(run_dir)))
    out = capsys.readouterr().out
    assert f"warning: checkpoint {newest} is truncated" in out
    assert "from checkpoint-00000002.pt" in out
    assert without_time(read_metrics(run_dir)) == expected
    assert all(torch.equal(weights[n], final_weights(run_dir)[n]) for n in weights)


def test_resume_refuses_model_changes_listing_each(tmp_path):
    """--resume with a model-changing override names every differing key, old -> new."""
    from sparse_maml.cli import train

    config = _tiny_config(tmp_path / "run", "train.epochs=1")
    run_dir = train.main(config)
    cfg, resume_dir = train.load_run_config(
        None, ["model.widths=[8,8,8,8]", "inner.mask=relu", "train.epochs=2"], str(run_dir))
    with pytest.raises(ConfigError) as err:
        train.main(cfg, resume_dir)
    message = str(err.value)
    assert "model.widths: [4, 4, 4, 4] -> [8, 8, 8, 8]" in message
    assert "inner.mask: 'binary_ste' -> 'relu'" in message
    assert "train.epochs" not in message.split("keys that may change")[0]
    assert load_config(run_dir / "config.yaml").train.epochs == 1  # nothing was rewritten


@pytest.mark.parametrize("stop_step", [3, 5], ids=["at-the-reset-point", "after-it"])
def test_resume_across_an_optimizer_reset_is_exact(tmp_path, stop_step):
    """outer.reset_optimizer_every=3 clears Adam before meta-batches 3 and 6 of 8: a run stopped
    at the reset point (checkpoint written before the reset) or after it, then resumed, equals the
    uninterrupted run; the reset happened (Adam's step count restarted) and changed the run."""
    from sparse_maml.cli import train

    reset = ("outer.reset_optimizer_every=3", "train.val_every=1")
    reference = train.main(_tiny_config(tmp_path / "reference", *reset))
    adam = checkpoint.load(checkpoint.list_checkpoints(reference)[-1][1])["theta_optimizer"]["state"]
    assert {int(s["step"]) for s in adam.values()} == {8 - 6}  # steps since the last reset
    no_reset = train.main(_tiny_config(tmp_path / "no_reset", "train.val_every=1"))
    assert any(not torch.equal(a, b) for a, b in zip(final_weights(reference).values(),
                                                     final_weights(no_reset).values()))

    cut = _stopped_run(tmp_path / "cut", stop_step, *reset)
    saved = checkpoint.load(checkpoint.list_checkpoints(cut)[-1][1])
    assert saved["state"]["step"] == stop_step
    assert saved["state"]["optimizer_reset_step"] == (0 if stop_step == 3 else 3)
    train.main(*train.load_run_config(None, [], str(cut)))
    assert_same_run(reference, cut)
