"""Rows of the results table as scheduler jobs: one train.py command run by submitit, its stop
signals turned into a checkpoint and a requeue, and the state of a row read back from its run
folder and job files (utils/slurm.py submits rows and reports their states).

A row is one `python train.py ... run.dir=DIR run.resume=auto` command, as
`run_sparse_MAML.sh --dry-run` prints it; `RowJob` runs it in a child process and waits. When the
scheduler warns of the time limit (SIGUSR2, the signal submitit asks Slurm for) or preempts the
job, train.py finishes its meta-batch, checkpoints and exits 3; submitit then calls
`RowJob.checkpoint`, which hands back the same row to requeue, and the requeued train.py continues
from the checkpoint (`run.resume=auto`) exactly as if it had never stopped. A row that fails for a
reason of its own (exit 1, or 4 from the NaN guard) raises `RowFailed` and is not requeued. A row
on several GPUs or nodes runs train.py under torchrun (`torchrun_command`), one RowJob per node.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import submitit

# The job process only waits for train.py: it imports nothing of the package that imports torch
# (seconds per job and per requeue), hence these two names of train.py's and the run folder's,
# pinned to sparse_maml.cli.train.EXIT_STOPPED and sparse_maml.run_folder.METRICS by the tests.
EXIT_STOPPED = 3  # train.py stopped at a checkpoint and can continue
METRICS = "metrics.jsonl"

JOBS_FILE = "jobs.jsonl"  # one line per submitted job, in <parent of the run folders>/slurm/

# Slurm job states (sacct / squeue) that mean "waiting to run" and "running".
WAITING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "RESIZING",
           "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


class RowFailed(RuntimeError):
    """train.py ended with an error of the row's own (config, data, NaN guard): not requeued."""


class RowStopped(RuntimeError):
    """train.py stopped at a checkpoint on a signal the job did not turn into a requeue (scancel,
    a preemption that cancels): resubmitting continues the row."""


def run_dir_of(command: list[str]) -> Path:
    """The run.dir=... of a train.py command (the launcher names one for every row)."""
    dirs = [word.split("=", 1)[1] for word in command if word.startswith("run.dir=")]
    if not dirs:
        raise ValueError(f"no run.dir=... in the command {shlex.join(command)!r}: every row needs "
                         "its own run folder (run_sparse_MAML.sh --dry-run names one)")
    return Path(dirs[-1])


def torchrun_command(command: list[str], nodes: int, procs_per_node: int, node_rank: int = 0,
                     master: str = "127.0.0.1", port: int = 29500) -> list[str]:
    """`python train.py ARGS` as `python -m torch.distributed.run ... train.py ARGS` for one node
    of a run on `nodes` nodes with `procs_per_node` processes each (one per GPU). One node
    rendezvouses alone (--standalone); several meet at master:port, node_rank 0 being master."""
    if len(command) < 2 or Path(command[1]).name != "train.py":
        raise ValueError(f"a row on several processes must be `python train.py ...`, not "
                         f"{shlex.join(command)!r}")
    where = (["--standalone"] if nodes == 1 else
             [f"--nnodes={nodes}", f"--node_rank={node_rank}", f"--master_addr={master}",
              f"--master_port={port}"])
    return [command[0], "-m", "torch.distributed.run", *where, f"--nproc_per_node={procs_per_node}",
            *command[1:]]


def is_finished(run_dir: Path) -> bool:
    """Whether train.py wrote its test result (test.py's records have step -1) into run_dir."""
    return any(r.get("kind") == "test" and r.get("step", -1) >= 0
               for r in _jsonl(Path(run_dir) / METRICS))


def progress(run_dir: Path) -> tuple[Optional[int], Optional[float]]:
    """(epochs completed, best validation accuracy) from metrics.jsonl; None where not reached."""
    records = _jsonl(Path(run_dir) / METRICS)
    epochs = [r["epoch"] for r in records if r.get("kind") == "train" and "epoch" in r]
    accs = [r["accuracy"] for r in records if r.get("kind") == "val" and "accuracy" in r]
    return max(epochs, default=None), max(accs, default=None)


def _jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file ([] if missing), but for lines that do not parse (blank,
    or being written while we read)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@dataclass
class RowJob(submitit.helpers.Checkpointable):
    """One row of the table as a submitit job: runs `command` in `cwd` until it finishes.

    threads: OMP_NUM_THREADS for train.py (the job's CPUs), unless the environment sets it.
    nodes, procs_per_node: more than one process in all runs train.py under torchrun, this job
    being one node of it (submitit's job environment gives the node rank and the first host).
    """

    name: str
    command: list[str]
    cwd: str
    threads: Optional[int] = None
    nodes: int = 1
    procs_per_node: int = 1

    def __post_init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._last_error = ""
        self._worker_exits: list[int] = []  # torchrun's report of its failed workers

    @property
    def distributed(self) -> bool:
        return self.nodes * self.procs_per_node > 1

    @property
    def run_dir(self) -> Path:
        return Path(self.cwd) / run_dir_of(self.command)

    def __call__(self) -> str:
        """Run the row to its end; returns a one-line summary, raises RowFailed / RowStopped."""
        if is_finished(self.run_dir):
            return f"{self.name}: finished already ({self.run_dir})"
        env = dict(os.environ)
        if self.threads and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(self.threads)
        command = self.command
        if self.distributed:
            job = submitit.JobEnvironment()
            # A port per job, so that two jobs sharing a first node do not meet each other.
            port = 20000 + int(re.sub(r"\D", "", job.raw_job_id) or 0) % 20000
            command = torchrun_command(command, self.nodes, self.procs_per_node, job.node,
                                       job.hostnames[0], port)
            # torchrun's agent passes SIGUSR2 on to its workers instead of dying of it
            # (its --signals-to-handle, read from PET_SIGNALS_TO_HANDLE).
            env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2")
        print(f"{self.name}: {shlex.join(command)}", flush=True)
        self._proc = subprocess.Popen(command, cwd=self.cwd, env=env, stderr=subprocess.PIPE,
                                      text=True, bufsize=1)
        # A thread copies train.py's stderr to the job's (keeping its last line) and then reaps
        # the process, so that neither the main flow nor a signal handler ever blocks in
        # Popen.wait, which a handler interrupting another wait would deadlock on.
        threading.Thread(target=self._follow, daemon=True).start()
        status = self._wait()
        if status == 0:
            return f"{self.name}: finished ({self.run_dir})"
        if status == EXIT_STOPPED:
            raise RowStopped(f"{self.name}: stopped at a checkpoint in {self.run_dir}; submit "
                             "again to continue")
        raise RowFailed(f"{self.name}: train.py exited with status {status}"
                        + (f": {self._last_error}" if self._last_error else ""))

    def checkpoint(self, *args, **kwargs) -> Optional[submitit.helpers.DelayedSubmission]:
        """submitit's hook on the time-limit or preemption signal: let train.py checkpoint and
        exit, then hand back this row to requeue (None, no requeue, if train.py failed)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            # On Slurm train.py has the signal already; locally only this process got it.
            # A repeated SIGUSR2 does not end train.py (StopSignal), so passing it on is safe.
            proc.send_signal(signal.SIGUSR2)
            status = self._wait()
            # torchrun's status after a stop does not tell it from a failure: requeue; a real
            # failure shows again in the requeued job, which then ends without a requeue.
            if not self.distributed and status not in (0, EXIT_STOPPED) and status > 0:
                print(f"{self.name}: train.py exited with status {status} on the stop signal; "
                      "not requeued", file=sys.stderr, flush=True)
                return None
        print(f"{self.name}: checkpointed; requeued to continue from {self.run_dir}", flush=True)
        return submitit.helpers.DelayedSubmission(replace(self))

    def _follow(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            # train.py's message starts with "error:" (its hints follow); else the last words
            if line.startswith("error:") or (re.search(r"[A-Za-z]", line)
                                             and not self._last_error.startswith("error:")):
                self._last_error = line.strip()
            reported = re.match(r"\s*exitcode\s*:\s*(-?\d+)", line)
            if reported:
                self._worker_exits.append(int(reported.group(1)))
        self._proc.wait()

    def _wait(self) -> int:
        """train.py's exit status, once the reader thread has reaped it. torchrun exits 1 when
        its workers stop at a checkpoint: if every worker it reports exited 3, so did the run."""
        assert self._proc is not None
        while self._proc.returncode is None:
            time.sleep(0.05)
        status = self._proc.returncode
        if self.distributed and status != 0 and set(self._worker_exits) == {EXIT_STOPPED}:
            return EXIT_STOPPED
        return status


def record_jobs(folder: Path, entries: list[dict]) -> None:
    """Append one line per submitted job to folder/jobs.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / JOBS_FILE, "a") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)


def latest_jobs(folder: Path) -> dict[str, dict]:
    """The newest recorded job of each run folder (key: run_dir as recorded)."""
    return {entry["run_dir"]: entry for entry in _jsonl(Path(folder) / JOBS_FILE)}


def job_outcome(entry: dict) -> Optional[tuple[str, str]]:
    """("success", summary) or ("error", last line of the error) from submitit's result file of
    the job, or None if the job has not ended (or ended without writing one)."""
    paths = submitit.core.utils.JobPaths(entry["folder"], job_id=entry["job_id"])
    if not paths.result_pickle.is_file():
        return None
    kind, value = submitit.core.utils.pickle_load(paths.result_pickle)
    if kind == "success":
        return kind, str(value)
    lines = [line for line in str(value).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "unknown error"
    # "package.module.RowFailed: message" -> "RowFailed: message"
    head, _, message = last.partition(": ")
    return kind, f"{head.rsplit('.', 1)[-1]}: {message}" if message else last


@dataclass
class RowState:
    """What the status command prints for one row."""

    name: str
    state: str  # not started | queued | requeued | running | stopped | finished | failed
    job_id: str
    epoch: Optional[int]
    best_val: Optional[float]
    detail: str


def row_state(name: str, run_dir: Path, entry: Optional[dict],
              scheduler_state: Optional[str]) -> RowState:
    """The state of a row from its run folder, its newest job record (None: never submitted) and
    the scheduler's state of that job (None where the scheduler does not know it)."""
    from .run_folder import holds_run

    epoch, best = progress(run_dir)

    def state(kind: str, detail: str = "") -> RowState:
        return RowState(name, kind, entry["job_id"] if entry else "-", epoch, best, detail)

    def newest_step() -> int:
        from .checkpoint import list_checkpoints  # imports torch: only for a stopped row
        return max((step for step, _ in list_checkpoints(run_dir)), default=0)

    started = holds_run(run_dir)
    if is_finished(run_dir):
        return state("finished")
    scheduler_state = scheduler_state.split()[0].upper() if scheduler_state else None
    if scheduler_state in WAITING:
        return (state("requeued", f"stopped at step {newest_step()}, waiting to continue")
                if started else state("queued"))
    if scheduler_state in RUNNING:
        return state("running")
    if entry is None:
        return (state("stopped", "run folder without a recorded job") if started
                else state("not started"))
    outcome = job_outcome(entry)
    if outcome is not None:
        kind, detail = outcome
        if kind == "error":
            return state("stopped" if detail.startswith(RowStopped.__name__) else "failed", detail)
        return state("failed", f"job ended ({detail}) but {run_dir} holds no test result")
    ended = f"job {scheduler_state.lower()}" if scheduler_state else "job ended"
    if started:
        return state("stopped", f"{ended} at step {newest_step()} without a result")
    return state("failed", f"{ended} before train.py wrote its run folder (see the job's log)")
