"""torchrun: a meta-batch split over 2 CPU processes (gloo) gives the run of one process.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node=2` as a user
would, and compares with a single process on the same total meta-batch: the final weights agree
within float tolerance (the outer gradients are summed in another order), the validation and test
accuracies are equal, and rank 0 alone writes one run folder.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparse_maml import checkpoint, distributed
from sparse_maml.config import ConfigError
from sparse_maml.run_folder import read_metrics

import helpers

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)
# 3-way tasks (so accuracies are not all at chance), 4 tasks per meta-batch, and evaluation batches
# (of 2) that do not split evenly into the 7 validation and 5 test tasks.
TINY = ["model.widths=[4,4,4,4]", "data.num_ways=3", "data.num_shots=1", "data.num_query=2",
        "train.epochs=2", "train.batches_per_epoch=3", "train.val_every=1",
        "train.num_val_tasks=7", "train.num_test_tasks=5", "train.eval_batch_size=2",
        "inner.steps=1", "inner.eval_steps=1", "outer.meta_batch_size=4",
        "run.tensorboard=false", "run.progress=false", "run.device=cpu",
        # SGD: Adam would turn the float noise in the (zero) gradients of the conv biases before
        # BatchNorm into lr-sized steps that differ with the summation order (see distributed.md).
        "outer.optimizer=sgd", "outer.mask_optimizer=sgd", "outer.lr=0.05", "outer.mask_lr=0.05"]


def python(*args: str, cwd: Path, processes: int = 1) -> subprocess.CompletedProcess:
    """Run a script alone, or under torchrun with `processes` CPU processes."""
    launcher = ([] if processes == 1 else
                ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"])
    result = subprocess.run([sys.executable, *launcher, *args], cwd=cwd, env=ENV,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    _, path = checkpoint.list_checkpoints(run_dir)[-1]
    return checkpoint.load(path)["learner"]


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def assert_same_training(one: Path, two: Path) -> None:
    """Same weights (within tolerance), same validation accuracies, same train records."""
    wa, wb = final_weights(one), final_weights(two)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [(r["step"], r["accuracy"], r["ci95"]) for r in records(one, "val")] == \
        [(r["step"], r["accuracy"], r["ci95"]) for r in records(two, "val")]
    for a, b in zip(records(one, "train"), records(two, "train"), strict=True):
        assert a["accuracy"] == pytest.approx(b["accuracy"], rel=1e-6)  # float32 sums
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["skipped_steps"] == b["skipped_steps"] == 0


def test_two_processes_train_like_one_and_write_one_run_folder(tmp_path):
    """Sum-reduced outer loss: 2 processes x 2 tasks == 1 process x 4 tasks; one time-stamped
    folder (its name broadcast from rank 0) holds the run."""
    one = tmp_path / "one"
    python(str(ROOT / "train.py"), *TINY, f"run.dir={one}", cwd=tmp_path)
    out = python(str(ROOT / "train.py"), *TINY, f"run.out_dir={tmp_path / 'runs'}", "run.name=dist",
                 cwd=tmp_path, processes=2)
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("dist-"), folders
    assert out.stdout.count("run folder:") == 1  # rank 0 alone prints
    assert "torchrun: 2 processes, 2 tasks of each meta-batch per process" in out.stdout
    two = folders[0]
    assert_same_training(one, two)
    assert [r["accuracy"] for r in records(one, "test")] == \
        [r["accuracy"] for r in records(two, "test")]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_generator_noise_and_mean_loss_do_not_depend_on_the_split_then_test_py(tmp_path):
    """sparse-MAML+ (per-task generator noise) with a mean-reduced loss trains alike on 1 and 2
    processes, the 2-process run stopped after epoch 1 and resumed under torchrun; test.py on 2
    processes scores the 5 test tasks as one process does."""
    args = [*TINY, "inner.mask_generator=true", "outer.loss_reduction=mean",
            "train.test_after_training=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    python(str(ROOT / "train.py"), *args, f"run.dir={one}", cwd=tmp_path)
    python(str(ROOT / "train.py"), *args, "train.epochs=1", f"run.dir={two}", cwd=tmp_path,
           processes=2)
    resumed = python(str(ROOT / "train.py"), "--resume", str(two), "train.epochs=2", cwd=tmp_path,
                     processes=2)
    assert resumed.stdout.count("resuming") == 1
    assert_same_training(one, two)
    alone = python(str(ROOT / "test.py"), str(one), cwd=tmp_path)
    shared = python(str(ROOT / "test.py"), str(one), cwd=tmp_path, processes=2)
    assert shared.stdout.count("synthetic/test:") == 1
    assert alone.stdout.splitlines()[0] == shared.stdout.splitlines()[0]
    tests = records(one, "test")
    assert len(tests) == 2 and tests[0]["accuracy"] == tests[1]["accuracy"]
    assert tests[0]["num_tasks"] == tests[1]["num_tasks"] == 5


def test_meta_batch_must_divide_among_the_processes():
    """The start-up check names outer.meta_batch_size and the world size."""
    distributed.check_meta_batch(4, world=2)
    with pytest.raises(ConfigError, match=r"outer.meta_batch_size=3 .* world size 2"):
        distributed.check_meta_batch(3, world=2)


def test_blocks_cover_the_items_in_order():
    """Contiguous blocks of 7 items over 3 ranks: sizes differ by at most one, nothing twice."""
    blocks = [distributed.block(7, r, world=3) for r in range(3)]
    assert [i for b in blocks for i in b] == list(range(7))
    assert {len(b) for b in blocks} <= {2, 3}


def test_single_process_needs_no_process_group(monkeypatch):
    """Without torchrun's WORLD_SIZE nothing is initialised and the helpers are identities."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup("cpu") == torch.device("cpu")
    assert not distributed.is_distributed() and distributed.is_main_process()
    values = torch.arange(3.0)
    assert distributed.all_reduce_sum(values) is values
    assert distributed.gather_blocks(values, [3]) is values
    assert distributed.on_main(lambda x: x + 1, 1) == 2


def run_sweep(*args: str, commands: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "utils" / "sweep.py"), *args],
                          input="\n".join(commands), cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)


def test_sweep_runs_one_command_per_gpu_at_a_time(tmp_path):
    """Each command sees one GPU in CUDA_VISIBLE_DEVICES and never shares it (a lock file per GPU
    proves it); a failing command fails the sweep, the others still run."""
    probe = ("import os, sys, time; gpu = os.environ['CUDA_VISIBLE_DEVICES']; "
             "lock = f'lock-{gpu}'; fd = os.open(lock, os.O_CREAT | os.O_EXCL); time.sleep(0.3); "
             "os.close(fd); os.remove(lock); open(f'ran-{sys.argv[1]}-on-{gpu}', 'w').close()")
    commands = [f"{sys.executable} -c {shlex.quote(probe)} {i}" for i in range(6)]
    result = run_sweep("--gpus", "0,1", "--logs", "logs", commands=commands, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = sorted(p.name for p in tmp_path.glob("ran-*"))
    assert [name.split("-")[1] for name in ran] == [str(i) for i in range(6)]
    assert {name.split("-on-")[1] for name in ran} == {"0", "1"}  # both GPUs were used
    failing = run_sweep("--gpus", "none", "--jobs", "2", "--logs", "logs2", cwd=tmp_path,
                        commands=["# a comment", f"{sys.executable} -c 'import sys; sys.exit(3)'",
                                  f"{sys.executable} -c 'print(42)'"])
    assert failing.returncode == 1 and "1 of 2 failed: [1]" in failing.stderr
    assert (tmp_path / "logs2" / "2.log").read_text().strip() == "42"


def test_sweep_reads_the_dry_run_of_run_sparse_maml(tmp_path):
    """run_sparse_MAML.sh --dry-run prints a command per run; sweep splits them as a shell does."""
    dry = subprocess.run(["bash", str(ROOT / "run_sparse_MAML.sh"), "--dry-run", "--debug",
                          "--seeds", "2", "sparse_maml_conv4_5shot"],
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    import sweep
    commands, bad = sweep.read_commands(dry.stdout.splitlines())
    assert len(commands) == 2 and bad == []
    assert all(c[1] == "train.py" and "model.widths=[2,2,2,2]" in c for c in commands)
    assert [c for c in commands[1] if c.startswith("run.seed=")] == ["run.seed=1"]


def test_sweep_skips_a_bad_line_and_gives_each_cpu_command_its_share_of_threads(tmp_path):
    probe = f"{sys.executable} -c 'import os; print(os.environ[\"OMP_NUM_THREADS\"])'"
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, str(ROOT / "utils" / "sweep.py"), "--gpus", "none",
                             "--jobs", "2", "--logs", "logs"], input=f"echo 'unclosed\n{probe}\n",
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sweep: line 1 skipped (No closing quotation): echo 'unclosed" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"{share} thread(s) each (OMP_NUM_THREADS)" in result.stdout
    assert (tmp_path / "logs" / "1.log").read_text().strip() == str(share)


def test_sweep_stopped_by_sigterm_lists_the_commands_that_never_started(tmp_path):
    """The running command checkpoints (exit 3 here) and the waiting ones are named."""
    stopper = (f"{sys.executable} -c 'import signal, sys, time; "
               "signal.signal(signal.SIGTERM, lambda *a: sys.exit(3)); "
               "open(\"started\", \"w\").close(); time.sleep(60)'")
    later = [f"{sys.executable} -c 'print({i})'" for i in (2, 3)]
    (tmp_path / "commands.txt").write_text("\n".join([stopper, *later]) + "\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "utils" / "sweep.py"), "--gpus", "none",
                             "--logs", "logs", "commands.txt"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=ENV, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, out + err
    assert "stopped at a checkpoint (resumable) 1" in out
    assert "1 stopped at a checkpoint [1], 2 never started:" in err
    assert f"  2: {later[0]}" in err and f"  3: {later[1]}" in err


EVAL_SCRIPT = """
import sys
import torch
from sparse_maml import distributed
from sparse_maml.config import load_config
from sparse_maml.evaluation import evaluate
from sparse_maml.experiment import build_experiment

config = load_config(None, [*TINY, "inner.mask_generator=true", "run.device=cpu"])
device = distributed.setup("cpu")
exp = build_experiment(config, device)
noise = []
exp.learner.generator.register_forward_pre_hook(lambda module, args: noise.append(args[0].clone()))
accs = evaluate(exp.learner, exp.val_episodes, 7, 2, 1, device)
torch.save({"noise": torch.cat(noise), "accs": torch.as_tensor(accs),
            "rng": torch.get_rng_state()}, f"{sys.argv[1]}/rank{distributed.rank()}.pt")
distributed.cleanup()
"""


def test_split_evaluation_sees_the_noise_and_random_stream_of_one_process(tmp_path):
    """sparse-MAML+ evaluation of 7 tasks in batches of 2 on 2 processes: each task gets the
    generator noise it gets in one process, the accuracies are gathered in task order, and every
    process's random stream ends where the single process's does."""
    script = tmp_path / "evaluate_split.py"
    script.write_text(EVAL_SCRIPT.replace("TINY", repr(helpers.TINY)))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    python(str(script), str(tmp_path / "one"), cwd=tmp_path)
    python(str(script), str(tmp_path / "two"), cwd=tmp_path, processes=2)
    alone = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    assert len(alone["noise"]) == 7
    assert torch.equal(torch.cat([r["noise"] for r in ranks]), alone["noise"])
    for r in ranks:
        assert torch.equal(r["accs"], alone["accs"])
        assert torch.equal(r["rng"], alone["rng"])
