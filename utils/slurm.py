"""Run the rows of the results table as Slurm jobs (through submitit) and see where each stands.

    ./run_sparse_MAML.sh --dry-run | python utils/slurm.py submit --partition gpu --time 8:00:00
    ./run_sparse_MAML.sh --dry-run | python utils/slurm.py status          # every row's state
    ./run_sparse_MAML.sh --dry-run | python utils/slurm.py status --resubmit   # failed and stopped
    ./run_sparse_MAML.sh --dry-run | python utils/slurm.py status --cancel     # queued and running
    ./run_sparse_MAML.sh --dry-run ROW | python utils/slurm.py submit --print-sbatch   # no submit

Rows are train.py commands as `run_sparse_MAML.sh --dry-run` prints them (each names its run.dir
and continues it with run.resume=auto), from the files given or stdin. `submit` sends each row not
finished, queued or running as a job (one job array unless --no-array); the jobs' logs and files go
to <runs>/slurm/<job id>/, their ids to <runs>/slurm/jobs.jsonl. A job warned of its time limit
(SIGUSR2, --signal-delay seconds before it) or preempted lets train.py checkpoint, and is requeued
to continue where it stopped; a failing row is not (`status` shows its last error line, `status
--resubmit` submits it again). --local runs the jobs on this machine through submitit's local
executor, all at once (utils/sweep.py shares a machine's GPUs). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

try:
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    import sparse_maml
    from sparse_maml.jobs import RowJob, latest_jobs, record_jobs, row_state, run_dir_of
except ImportError as err:
    sys.exit(f"slurm.py: {err}: install the requirements (pip install -r requirements.txt)")
from sweep import command_lines, read_commands

# The package's folder, put on the jobs' PYTHONPATH: the job process unpickles a RowJob.
PACKAGE_ROOT = Path(sparse_maml.__file__).resolve().parents[1]

# Executor options: None means "not given" (status --resubmit then keeps the recorded value).
DEFAULTS = {"partition": None, "account": None, "qos": None, "nodes": 1, "gpus": 1, "cpus": 4,
            "mem": None, "time": "4:00:00", "constraint": None, "sbatch": [], "setup": [],
            "signal_delay": 120, "max_timeouts": 100, "array": True, "array_parallelism": 256,
            "local": False}


def minutes(text: str) -> int:
    """Slurm time limit (MINUTES, H:MM:SS, D-HH:MM:SS or D-HH) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"--time {text!r}: expected MINUTES, H:MM:SS or D-HH:MM:SS")
    days, a, b, c = match.groups()
    if b is None:  # MINUTES, or D-HH
        total = int(a) * (60 if days else 1)
    else:  # [D-]H:MM[:SS]
        total = int(a) * 60 + int(b) + int(c or 0) / 60
    total += int(days or 0) * 24 * 60
    if total <= 0:
        raise ValueError(f"--time {text!r}: must be positive")
    return max(1, round(total))


def sbatch_parameters(options: dict[str, Any], job_name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (sbatch flags) for the options."""
    extra: dict[str, Any] = {"requeue": True}  # a preempted job goes back to the queue
    for line in options["sbatch"]:
        key, sep, value = line.lstrip("-").partition("=")
        extra[key] = value if sep else True
    gb = options["mem"]  # sbatch's --mem: whole GB, else MB
    mem = (f"{int(gb)}GB" if gb == int(gb) else f"{round(gb * 1024)}MB") if gb else None
    params = {"job_name": job_name, "partition": options["partition"],
              "account": options["account"], "qos": options["qos"], "nodes": options["nodes"],
              "ntasks_per_node": 1, "gpus_per_node": options["gpus"] or None,
              "cpus_per_task": options["cpus"], "constraint": options["constraint"], "mem": mem,
              "time": minutes(options["time"]), "signal_delay_s": options["signal_delay"],
              "array_parallelism": options["array_parallelism"],
              "setup": [f"export PYTHONPATH={shlex.quote(str(PACKAGE_ROOT))}"
                        "${PYTHONPATH:+:$PYTHONPATH}", *options["setup"]],
              "additional_parameters": extra}
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(options: dict[str, Any], folder: Path, rows: int = 1) -> str:
    """The sbatch script submitit writes for these options (a job array if rows > 1)."""
    command = shlex.join([sys.executable, "-u", "-m", "submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=folder,
                               map_count=rows if rows > 1 and options["array"] else None,
                               **sbatch_parameters(options, "sparse-maml"))


def make_executor(options: dict[str, Any], folder: Path, job_name: str) -> submitit.Executor:
    """A Slurm executor (or submitit's local one with options['local']) for the options."""
    params = sbatch_parameters(options, job_name)
    if options["local"]:
        executor = submitit.LocalExecutor(folder, max_num_timeout=options["max_timeouts"])
        params = {"timeout_min": params["time"], "gpus_per_node": options["gpus"],
                  "signal_delay_s": options["signal_delay"], "setup": params["setup"]}
    else:
        try:
            executor = submitit.SlurmExecutor(folder, max_num_timeout=options["max_timeouts"])
        except RuntimeError as err:  # no srun on this machine
            raise SystemExit(f"slurm.py: {err} (use --local to run the rows on this machine)")
    executor.update_parameters(**params)
    return executor


class Row:
    """One train.py command of the input: its name, run folder and jobs folder (<runs>/slurm)."""

    def __init__(self, line: str, cwd: Path):
        self.command, self.cwd = shlex.split(line), cwd
        script = self.command[1] if len(self.command) > 1 else ""
        if script.endswith(".py") and not (cwd / script).is_file():
            raise ValueError(f"no {script} in {cwd}: run slurm.py from the repository root "
                             "(the jobs start the commands there)")
        self.run_dir = (cwd / run_dir_of(self.command)).resolve()
        names = [w.split("=", 1)[1] for w in self.command if w.startswith("run.name=")]
        self.name = names[-1] if names else self.run_dir.name
        self.folder = self.run_dir.parent / "slurm"


def states_of(rows: list[Row]) -> list[tuple[Row, Optional[dict], Any]]:
    """(row, its newest job record or None, its RowState) for every row. The scheduler is asked
    only about jobs it still holds; what became of the others is read from the run folder and the
    job's result file."""
    records = {}
    for folder in {row.folder for row in rows}:
        records.update(latest_jobs(folder))
    entries = [records.get(str(row.run_dir)) for row in rows]
    queue = slurm_queue() if any(e and e["executor"] == "slurm" for e in entries) else {}
    if queue is None:
        print("slurm.py: squeue is not available: queued and running rows show as stopped",
              file=sys.stderr)

    def scheduler_state(entry: Optional[dict]) -> Optional[str]:
        if entry is None:
            return None
        if entry["executor"] == "local":  # the job id is the local controller's process id
            return "RUNNING" if _alive(int(entry["job_id"])) else None
        return (queue or {}).get(entry["job_id"])

    return [(row, entry, row_state(row.name, row.run_dir, entry, scheduler_state(entry)))
            for row, entry in zip(rows, entries)]


def slurm_queue() -> Optional[dict[str, str]]:
    """Job id -> state (PENDING, RUNNING, ...) of this user's jobs in the Slurm queue, one entry
    per array element; None where squeue cannot be run."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-u", getpass.getuser()],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return dict(line.split(None, 1) for line in out.splitlines() if len(line.split()) == 2)


def _alive(pid: int) -> bool:
    """Whether the process runs; a zombie (ended, not yet reaped by its parent) has ended."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except ProcessLookupError:
        return False
    except OSError:  # not ours to signal, or no /proc to read: it runs
        return True


def submit(rows: list[Row], options: dict[str, Any]) -> None:
    """Submit the rows (one job array per jobs folder unless options['array'] is off), print each
    job id and record the jobs."""
    procs = max(options["gpus"], 1)  # train.py processes per node: one per GPU
    threads = max(1, options["cpus"] // procs)
    for folder in sorted({row.folder for row in rows}):
        group = [row for row in rows if row.folder == folder]
        template = folder / "%j"
        jobs = [RowJob(row.name, row.command, str(row.cwd), threads, options["nodes"], procs)
                for row in group]
        if options["array"] and len(group) > 1:
            executor = make_executor(options, template, "sparse-maml")
            with executor.batch():
                submitted = [executor.submit(job) for job in jobs]
        else:
            submitted = [make_executor(options, template, job.name).submit(job) for job in jobs]
        entries = [{"name": row.name, "run_dir": str(row.run_dir), "job_id": str(job.job_id),
                    "executor": "local" if options["local"] else "slurm",
                    "folder": str(template), "cwd": str(row.cwd), "command": row.command,
                    "options": options, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
                   for row, job in zip(group, submitted)]
        for entry in entries:
            log = submitit.core.utils.JobPaths(template, job_id=entry["job_id"]).stdout
            print(f"submitted {entry['name']}: job {entry['job_id']} (log {log})", flush=True)
        record_jobs(folder, entries)


def print_table(states: list) -> None:
    """One line per row: name, state, job id, epoch, best validation accuracy, detail."""
    width = max([len(row.name) for row, _, _ in states] + [3])
    print(f"{'row':<{width}}  {'state':<11}  {'job':<12}  {'epoch':>5}  {'best val':>8}  detail")
    for row, _, s in states:
        epoch = "-" if s.epoch is None else str(s.epoch)
        best = "-" if s.best_val is None else f"{s.best_val:.2%}"
        print(f"{row.name:<{width}}  {s.state:<11}  {s.job_id:<12}  {epoch:>5}  {best:>8}  "
              f"{s.detail}".rstrip())
    counts = Counter(s.state for _, _, s in states)
    print(", ".join(f"{n} {state}" for state, n in counts.items()))


def cancel(states: list) -> int:
    """Cancel the jobs of queued, requeued and running rows (scancel; a local job's train.py gets
    SIGTERM, checkpoints and stops); returns the exit status."""
    ids = [entry["job_id"] for _, entry, s in states if entry and entry["executor"] == "slurm"
           and s.state in ("queued", "requeued", "running")]
    for row, entry, s in states:
        if entry and s.state == "running" and entry["executor"] == "local":
            for pid in _children_of_job_tasks(int(entry["job_id"])):
                os.kill(pid, signal.SIGTERM)
                print(f"stopping {row.name}: SIGTERM to its train.py (process {pid})")
    if ids:
        try:
            subprocess.run(["scancel", *ids], check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            print(f"slurm.py: scancel failed: {err}", file=sys.stderr)
            return 1
        print(f"cancelled {len(ids)} job(s): {' '.join(ids)}")
    return 0


def _children_of_job_tasks(pid: int) -> list[int]:
    """The processes a local job's tasks started (train.py, or torchrun), found below the job's
    process in /proc: they, not the task, take a stop signal (the task ignores SIGTERM)."""
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    def children(parent: int) -> list[int]:
        return [int(c) for task in Path(f"/proc/{parent}/task").glob("*")
                for c in read(f"{task}/children").split()]

    todo, started = [pid], []
    while todo:
        for child in children(todo.pop()):
            if "submitit.core._submit" in read(f"/proc/{child}/cmdline"):
                started += children(child)
            else:
                todo.append(child)
    return started


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    """The job options shared by submit and status --resubmit (default None: not given)."""
    g = parser.add_argument_group("job options (status --resubmit: those of the last submission "
                                  "unless given)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--qos", help="Slurm quality of service")
    g.add_argument("--nodes", type=int, help="nodes per row (default 1); more than one runs "
                   "train.py under torchrun across them, the run folder on a file system every "
                   "node sees")
    g.add_argument("--gpus", type=int, help="GPUs per node (default 1; 0 for CPU jobs); more than "
                   "one runs train.py under torchrun, one process per GPU (outer.meta_batch_size "
                   "must be a multiple of nodes x GPUs)")
    g.add_argument("--cpus", type=int, help="CPUs per node, shared out as train.py's "
                                            "OMP_NUM_THREADS (default 4)")
    g.add_argument("--mem", type=float, help="memory per job in GB (default: the partition's)")
    g.add_argument("--time", help="time limit of each job, MINUTES or [D-]H:MM:SS (default "
                                  "4:00:00); a run longer than that continues in a requeued job")
    g.add_argument("--constraint", help="Slurm node constraint, e.g. a100")
    g.add_argument("--sbatch", action="append", metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch mail-type=FAIL (repeatable)")
    g.add_argument("--setup", action="append", metavar="LINE", help="a shell line run before "
                   "the job, e.g. 'source .venv/bin/activate' (repeatable)")
    g.add_argument("--signal-delay", type=int, help="seconds before the time limit at which the "
                   "job is told to checkpoint (default 120)")
    g.add_argument("--max-timeouts", type=int,
                   help="requeues after a time limit before the row gives up (default 100)")
    g.add_argument("--no-array", dest="array", action="store_const", const=False,
                   help="one job per row instead of one job array")
    g.add_argument("--array-parallelism", type=int, help="rows of an array running at once")
    g.add_argument("--local", action="store_const", const=True,
                   help="run the jobs on this machine (submitit's local executor)")


def options_from(args: argparse.Namespace, recorded: Optional[dict] = None) -> dict[str, Any]:
    """DEFAULTS, then the recorded options (if any), then the options given on the command line."""
    options = {**DEFAULTS, **(recorded or {})}
    options.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    return options


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="action", required=True)
    sub = commands.add_parser("submit", help="submit the rows that are not done, queued or running")
    sub.add_argument("--print-sbatch", action="store_true",
                     help="print the sbatch script submitit would write, and submit nothing")
    st = commands.add_parser("status", help="every row's state, job id, epoch and best accuracy")
    what = st.add_mutually_exclusive_group()
    what.add_argument("--cancel", action="store_true", help="cancel queued and running rows "
                      "(a local row: its train.py stops at a checkpoint)")
    what.add_argument("--resubmit", action="store_true",
                      help="submit the failed and stopped rows again (they continue)")
    for p in (sub, st):
        p.add_argument("files", nargs="*", help="files of train.py commands (default: stdin)")
        add_executor_options(p)
    args = parser.parse_args(argv)

    try:
        lines = command_lines(args.files)
    except OSError as err:
        print(f"slurm.py: {err}", file=sys.stderr)
        return 1
    try:
        options = options_from(args)
        minutes(options["time"])
        if options["nodes"] < 1 or options["gpus"] < 0 or options["cpus"] < 1:
            raise ValueError("--nodes and --cpus must be at least 1, --gpus at least 0")
        if options["local"] and options["nodes"] > 1:
            raise ValueError("--local runs on this one machine: --nodes must be 1")
    except ValueError as err:
        print(f"slurm.py: {err}", file=sys.stderr)
        return 2
    rows, bad = read_commands(lines, lambda line: Row(line, Path.cwd()))
    for number, _, err in bad:
        print(f"slurm.py: input line {number} skipped: {err}", file=sys.stderr)
    if not rows:
        print("slurm.py: no train.py commands in the input", file=sys.stderr)
        return 1
    exit_status = 1 if bad else 0

    if args.action == "submit" and args.print_sbatch:
        print(sbatch_script(options, rows[0].folder / "%j", len(rows)))
        return exit_status
    states = states_of(rows)
    resubmit = args.action == "status"
    if resubmit and not args.resubmit:
        print_table(states)
        status = cancel(states) if args.cancel else 0
        return exit_status or status

    # Rows submitted before keep their recorded options unless new ones are given.
    groups: dict[str, tuple[dict[str, Any], list[Row]]] = {}
    for row, entry, state in states:
        if state.state in ("failed", "stopped") or (state.state == "not started" and not resubmit):
            row_options = options_from(args, entry.get("options") if entry and resubmit else None)
            groups.setdefault(repr(sorted(row_options.items())), (row_options, []))[1].append(row)
        elif not resubmit:
            print(f"{row.name}: {state.state} (job {state.job_id}), not submitted")
    if not groups:
        print("nothing to submit")
    for row_options, group in groups.values():
        submit(group, row_options)
    return exit_status


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly
    sys.exit(main())
