"""utils/slurm.py and sparse_maml/jobs.py: rows as submitit jobs (run here by submitit's local
executor), a time-limit signal turned into a checkpoint and a requeue, the sbatch script, and the
state of each row."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from sparse_maml import checkpoint
from sparse_maml import jobs, run_folder
from sparse_maml.cli import train as train_cli
from sparse_maml.jobs import latest_jobs, row_state, torchrun_command
from sparse_maml.run_folder import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "utils" / "slurm.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
# A debug row with enough meta-batches to be stopped in the middle, checkpointing every 2.
ROW = [sys.executable, "train.py", "-c", "configs/sparse_maml_conv4_1shot.yaml",
       *[line.split("#")[0].strip() for line in (ROOT / "configs" / "debug.overrides").read_text()
         .splitlines() if line.split("#")[0].strip()],
       "train.epochs=2", "train.batches_per_epoch=12", "run.checkpoint_every=2",
       "run.keep_checkpoints=2", "run.deterministic=true", "run.device=cpu", "run.resume=auto"]


def row(runs: Path, name: str, *extra: str) -> str:
    return shlex.join([*ROW, *extra, f"run.name={name}", f"run.dir={runs / name}"])


def slurm(*args, commands: list[str], check: bool = True) -> subprocess.CompletedProcess:
    # Output to files, not pipes: local jobs inherit them and would hold a pipe open to their end.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        result = subprocess.run([sys.executable, str(SLURM), *map(str, args)], cwd=ROOT, env=ENV,
                                input="\n".join(commands) + "\n", stdout=out, stderr=err,
                                text=True, timeout=120)
        out.seek(0), err.seek(0)
        result.stdout, result.stderr = out.read(), err.read()
    if check and result.returncode != 0:
        raise AssertionError(f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def wait_for(predicate, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1][1])["learner"]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """Two identical tiny rows submitted through the local executor; the job of `cut` gets the
    time-limit signal (SIGUSR2, as submitit's controller sends it before a time limit) after its
    first checkpoint, is requeued and finishes. Returns the runs folder."""
    runs = tmp_path_factory.mktemp("table")
    out = slurm("submit", "--local", commands=[row(runs, "whole"), row(runs, "cut")]).stdout
    jobs = latest_jobs(runs / "slurm")
    assert {e["name"] for e in jobs.values()} == {"whole", "cut"}, out
    for entry in jobs.values():
        assert f"submitted {entry['name']}: job {entry['job_id']}" in out
    cut = jobs[str(runs / "cut")]
    wait_for(lambda: checkpoint.list_checkpoints(runs / "cut"), what="cut's first checkpoint")
    wrappers = [p for p in descendants(int(cut["job_id"])) if "submitit.core._submit" in cmdline(p)]
    assert len(wrappers) == 1, wrappers
    os.kill(wrappers[0], signal.SIGUSR2)
    folder = Path(cut["folder"].replace("%j", cut["job_id"]))
    for entry in jobs.values():
        result = Path(entry["folder"].replace("%j", entry["job_id"])) / f"{entry['job_id']}_0_result.pkl"
        wait_for(result.is_file, what=f"{entry['name']}'s result")
    log = (folder / f"{cut['job_id']}_0_log.out").read_text()
    log += (folder / f"{cut['job_id']}_0_log.err").read_text()
    assert "checkpointed; requeued to continue" in log, log
    assert "Requeued job" in log, log
    return runs


def test_interrupted_row_is_requeued_and_ends_equal_to_the_uninterrupted_row(table):
    stops = [r for r in read_metrics(table / "cut") if r.get("kind") == "train"]
    whole, cut = final_weights(table / "whole"), final_weights(table / "cut")
    assert checkpoint.list_checkpoints(table / "cut")[-1][0] == 24
    assert whole.keys() == cut.keys()
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name
    def results(run):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(run)]
    assert results(table / "whole") == results(table / "cut")
    assert len(stops) == 2


def test_the_resumed_job_continued_from_the_stop(table):
    """The requeued job's train.py resumed mid-run (not from scratch, not after the end)."""
    entry = latest_jobs(table / "slurm")[str(table / "cut")]
    folder = Path(entry["folder"].replace("%j", entry["job_id"]))
    out = (folder / f"{entry['job_id']}_0_log.out").read_text()
    done = [int(line.split(" meta-batches done")[0].split()[-1]) for line in out.splitlines()
            if " meta-batches done" in line]
    assert len(done) == 1 and 2 <= done[0] < 24, out


def test_failing_row_is_failed_with_its_error_and_not_requeued(table):
    bad = row(table, "bad", "inner.steps=-1")
    slurm("submit", "--local", commands=[bad])
    entry = latest_jobs(table / "slurm")[str(table / "bad")]
    result = Path(entry["folder"].replace("%j", entry["job_id"])) / f"{entry['job_id']}_0_result.pkl"
    wait_for(result.is_file, what="the bad row's result")
    log = (result.parent / f"{entry['job_id']}_0_log.out").read_text()
    assert "requeued" not in log.lower()
    out = slurm("status", commands=[row(table, "whole"), row(table, "cut"), bad,
                                    row(table, "never")]).stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert lines["whole"].split()[1:3] == ["finished", latest_jobs(table / "slurm")[
        str(table / "whole")]["job_id"]]
    assert lines["whole"].split()[3:5] == ["2", f"{max(r['accuracy'] for r in read_metrics(table / 'whole') if r['kind'] == 'val'):.2%}"]
    assert lines["cut"].split()[1] == "finished"
    assert lines["bad"].split()[1] == "failed"
    assert "RowFailed: bad: train.py exited with status 1: error:" in lines["bad"]
    assert "inner.steps" in lines["bad"]
    assert lines["never"].split()[1:3] == ["not", "started"]
    assert out.splitlines()[-1] == "2 finished, 1 failed, 1 not started"
    # --resubmit sends the failed row again, and only it
    again = slurm("status", "--resubmit", commands=[row(table, "whole"), bad]).stdout
    assert "submitted bad: job" in again and "whole" not in again, again
    entry = latest_jobs(table / "slurm")[str(table / "bad")]
    result = Path(entry["folder"].replace("%j", entry["job_id"])) / f"{entry['job_id']}_0_result.pkl"
    wait_for(result.is_file, what="the resubmitted bad row's result")


def test_cancelled_local_row_stops_at_a_checkpoint_and_shows_as_stopped(tmp_path):
    """status --cancel: a local row's train.py gets SIGTERM, checkpoints and exits 3; the job
    ends without a requeue and the row is 'stopped' (resubmitting continues it)."""
    command = row(tmp_path, "halt")
    slurm("submit", "--local", commands=[command])
    entry = latest_jobs(tmp_path / "slurm")[str(tmp_path / "halt")]
    wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "halt"), what="the first checkpoint")
    running = slurm("status", "--cancel", commands=[command]).stdout
    assert "halt  running" in running and "stopping halt: SIGTERM to its train.py" in running
    folder = Path(entry["folder"].replace("%j", entry["job_id"]))
    wait_for((folder / f"{entry['job_id']}_0_result.pkl").is_file, what="the job's end")
    line = slurm("status", commands=[command]).stdout.splitlines()[1]
    assert line.split()[:3] == ["halt", "stopped", entry["job_id"]], line
    assert "RowStopped: halt: stopped at a checkpoint" in line
    assert "requeued" not in (folder / f"{entry['job_id']}_0_log.out").read_text()
    assert 2 <= checkpoint.list_checkpoints(tmp_path / "halt")[-1][0] < 24


@pytest.mark.parametrize("scheduler, started, expected", [
    ("PENDING", False, "queued"),
    ("REQUEUED", True, "requeued"),
    ("PENDING", True, "requeued"),
    ("RUNNING", True, "running"),
    ("CANCELLED by 1000", True, "stopped"),
    ("TIMEOUT", False, "failed"),
    (None, True, "stopped"),
])
def test_state_from_the_scheduler_and_the_run_folder(tmp_path, table, scheduler, started, expected):
    """States only a cluster produces, from the scheduler's word and a run folder made here."""
    run_dir = tmp_path / "run"
    if started:  # the stopped half of a run: config, metrics of epoch 1, a checkpoint
        run_dir.mkdir()
        for name in ("config.yaml", "checkpoint-00000030.pt"):
            (run_dir / name).write_bytes((table / "whole" / "config.yaml").read_bytes())
        (run_dir / "metrics.jsonl").write_text(
            json.dumps({"kind": "train", "step": 30, "epoch": 1, "accuracy": 0.5}) + "\n"
            + json.dumps({"kind": "val", "step": 30, "epoch": 1, "accuracy": 0.625}) + "\n")
    entry = {"job_id": "77_3", "folder": str(tmp_path / "slurm" / "%j"), "executor": "slurm"}
    state = row_state("r", run_dir, entry, scheduler)
    assert state.state == expected, state
    assert state.job_id == "77_3"
    assert (state.epoch, state.best_val) == ((1, 0.625) if started else (None, None))


def test_torchrun_command_for_one_node_of_several():
    row = ["python", "train.py", "-c", "configs/x.yaml", "run.dir=runs/x"]
    assert torchrun_command(row, 2, 4, node_rank=1, master="gpu17", port=23456) == [
        "python", "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1",
        "--master_addr=gpu17", "--master_port=23456", "--nproc_per_node=4", "train.py", "-c",
        "configs/x.yaml", "run.dir=runs/x"]
    assert torchrun_command(row, 1, 2)[3:5] == ["--standalone", "--nproc_per_node=2"]
    with pytest.raises(ValueError, match="python train.py"):
        torchrun_command(["bash", "-c", "train.py"], 2, 1)


def test_row_on_two_processes_stops_under_torchrun_is_requeued_and_finishes(tmp_path):
    """--gpus 2 runs the row under torchrun (here on CPU, gloo): the time-limit signal reaches
    the workers through torchrun's agent, they checkpoint together, the job is requeued and the
    run continues from that step to its end."""
    slurm("submit", "--local", "--gpus", "2", "--cpus", "2",
          commands=[row(tmp_path, "pair", "outer.meta_batch_size=2")])
    entry = latest_jobs(tmp_path / "slurm")[str(tmp_path / "pair")]
    wait_for(lambda: checkpoint.list_checkpoints(tmp_path / "pair"), what="the first checkpoint")
    wrappers = [p for p in descendants(int(entry["job_id"]))
                if "submitit.core._submit" in cmdline(p)]
    os.kill(wrappers[0], signal.SIGUSR2)
    folder = Path(entry["folder"].replace("%j", entry["job_id"]))
    wait_for((folder / f"{entry['job_id']}_0_result.pkl").is_file, timeout=180, what="the result")
    out = (folder / f"{entry['job_id']}_0_log.out").read_text()
    assert "torch.distributed.run --standalone --nproc_per_node=2 train.py" in out
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1, out
    step = int(stopped[0].split()[3])
    assert f"{step} meta-batches done" in out and "checkpointed; requeued" in out
    assert out.count("torchrun: 2 processes") == 2
    assert [r["kind"] for r in read_metrics(tmp_path / "pair")][-1] == "test"
    assert checkpoint.list_checkpoints(tmp_path / "pair")[-1][0] == 24


def test_status_reads_the_slurm_queue_and_cancel_calls_scancel(tmp_path):
    """Against stand-ins for squeue and scancel: a queued row, a requeued one (its run folder holds
    a checkpoint) and a running one; --cancel cancels all three."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\nprintf '77_0 PENDING\\n77_1 PENDING\\n78 RUNNING\\n'\n")
    (bin_dir / "scancel").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'cancelled'}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    runs = tmp_path / "runs"
    (runs / "back").mkdir(parents=True)
    (runs / "back" / "config.yaml").write_text("run: {}\n")
    (runs / "back" / "checkpoint-00000012.pt").write_bytes(b"")
    (runs / "back" / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 12, "epoch": 1}) + "\n"
        + json.dumps({"kind": "val", "step": 12, "epoch": 1, "accuracy": 0.4}) + "\n")
    commands = [row(runs, name) for name in ("wait", "back", "going")]
    jobs.record_jobs(runs / "slurm", [
        {"name": name, "run_dir": str(runs / name), "job_id": job_id, "executor": "slurm",
         "folder": str(runs / "slurm" / "%j")}
        for name, job_id in [("wait", "77_0"), ("back", "77_1"), ("going", "78")]])
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, str(SLURM), "status", "--cancel"], cwd=ROOT, env=env,
                            input="\n".join(commands), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:4]}
    assert lines["wait"][1:3] == ["queued", "77_0"]
    assert lines["back"][1:5] == ["requeued", "77_1", "1", "40.00%"]
    assert "stopped at step 12, waiting to continue" in " ".join(lines["back"])
    assert lines["going"][1:3] == ["running", "78"]
    assert (tmp_path / "cancelled").read_text().split() == ["77_0", "77_1", "78"]
    assert "cancelled 3 job(s)" in result.stdout


def test_sbatch_script_asks_for_the_signal_requeue_gpus_and_time(tmp_path):
    commands = [row(tmp_path, "a"), row(tmp_path, "b")]
    out = slurm("submit", "--print-sbatch", "--partition", "gpu", "--account", "lab", "--qos",
                "high", "--gpus", "2", "--cpus", "10", "--mem", "48", "--time", "1-02:30:00",
                "--constraint", "a100", "--sbatch", "mail-type=FAIL", "--signal-delay", "150",
                "--setup", "module load cuda", commands=commands).stdout
    lines = out.splitlines()
    for flag in ["--signal=USR2@150", "--requeue", "--gpus-per-node=2", "--time=1590",
                 "--partition=gpu", "--account=lab", "--qos=high", "--cpus-per-task=10",
                 "--mem=48GB", "--constraint=a100", "--mail-type=FAIL", "--array=0-1%2",
                 "--ntasks-per-node=1", "--nodes=1", "--open-mode=append"]:
        assert f"#SBATCH {flag}" in lines, (flag, out)
    folder = tmp_path / "slurm"
    assert f"#SBATCH --output={folder}/%A_%a/%A_%a_0_log.out" in lines, out
    assert "module load cuda" in lines
    assert any(line.startswith("export PYTHONPATH=") for line in lines)
    assert lines[-2].startswith("srun --unbuffered") and "submitit.core._submit" in lines[-2]
    single = slurm("submit", "--print-sbatch", "--time", "90", "--no-array",
                   commands=commands).stdout
    assert "#SBATCH --time=90" in single.splitlines()
    assert not any(line.startswith("#SBATCH --array") for line in single.splitlines())
    assert "#SBATCH --signal=USR2@120" in single.splitlines()
    nodes = slurm("submit", "--print-sbatch", "--nodes", "2", "--gpus", "8", commands=commands)
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8"} <= set(
        nodes.stdout.splitlines())
    local_nodes = slurm("submit", "--local", "--nodes", "2", commands=commands, check=False)
    assert local_nodes.returncode == 2 and "--nodes must be 1" in local_nodes.stderr
    assert not list(tmp_path.iterdir())  # nothing submitted, nothing written


def test_bad_input_lines_and_options_are_one_line_messages(tmp_path):
    out = slurm("submit", "--print-sbatch", commands=["python train.py 'unclosed",
                                                       row(tmp_path, "a")], check=False)
    assert out.returncode == 1
    assert "input line 1 skipped: No closing quotation" in out.stderr
    assert "Traceback" not in out.stderr
    no_dir = slurm("status", commands=["python train.py -c configs/demo.yaml"], check=False)
    assert no_dir.returncode == 1 and "no run.dir=" in no_dir.stderr
    bad_time = slurm("submit", "--time", "soon", commands=[row(tmp_path, "a")], check=False)
    assert bad_time.returncode == 2 and "--time 'soon'" in bad_time.stderr
    no_slurm = slurm("submit", commands=[row(tmp_path, "a")], check=False)
    assert no_slurm.returncode != 0 and "--local" in no_slurm.stderr
    assert "Traceback" not in no_slurm.stderr


def test_stop_signal_takes_sigusr2_and_survives_its_repeat():
    """Slurm's time-limit warning stops training like SIGTERM; sent again (Slurm and the job both
    pass it on) it does not end the process, as a second SIGTERM would. (In a child process: a
    regression would kill it.)"""
    script = ("import os, signal\n"
              "from sparse_maml.cli.train import StopSignal\n"
              "with StopSignal() as stop:\n"
              "    assert not stop()\n"
              "    os.kill(os.getpid(), signal.SIGUSR2)\n"
              "    os.kill(os.getpid(), signal.SIGUSR2)\n"
              "    assert stop() and stop.received == signal.SIGUSR2\n"
              "assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL\n"
              "print('alive')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "alive\n", result


def test_the_job_side_names_match_the_package():
    assert jobs.EXIT_STOPPED == train_cli.EXIT_STOPPED
    assert jobs.METRICS == run_folder.METRICS
