"""Run the rows of the results table as Slurm jobs (through submitit) and see where each stands.

    ./run_sparse_MAML.sh --dry-run | python utils/slurm.py submit --partition gpu --time 8:00:00
    ./run_sparse_MAML.sh --dry-run | python utils/slurm.py status          # every row's state
    ./run_sparse_MAML.sh --dry-run | python utils/slurm.py status --resubmit   # failed and stopped
    ./run_sparse_MAML.sh --dry-run | python utils/slurm.py status --cancel     # queued and running
    ./run_sparse_MAML.sh --dry-run ROW | python utils/slurm.py submit --print-sbatch   # no submit

Rows are train.py commands, one per line, as `run_sparse_MAML.sh --dry-run` prints them (each
names its run.dir and continues it with run.resume=auto), read from the files given or stdin.
`submit` sends each row that is not finished, queued or running as one job (all of them as one
job array unless --no-array); each job's log and submitit's files go to <runs>/slurm/<job id>/
beside the run folders, and the job ids are printed and appended to <runs>/slurm/jobs.jsonl.

A job warned of its time limit (SIGUSR2, --signal-delay seconds before it) or preempted lets
train.py checkpoint and exit, and is requeued; the requeued job continues the run exactly where
it stopped. A row that fails (bad config, missing data, NaN guard) is not requeued: `status`
shows its last error line, `status --resubmit` submits it again once it is fixed. --local runs
the same jobs on this machine through submitit's local executor (all at once; to share a
machine's GPUs between many rows use utils/sweep.py).
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
from pathlib import Path
from typing import Any, Optional

try:
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    import sparse_maml
    from sparse_maml.jobs import (RowJob, jobs_folder, latest_jobs, record_jobs, row_state,
                                  run_dir_of)
except ImportError as err:
    sys.exit(f"slurm.py: {err}: install the requirements (pip install -r requirements.txt)")
from sweep import command_lines

# The package's folder, put on the jobs' PYTHONPATH: the job process unpickles a RowJob.
PACKAGE_ROOT = Path(sparse_maml.__file__).resolve().parents[1]

# Executor options: None means "not given" (status --resubmit then keeps the recorded value).
DEFAULTS = {"partition": None, "account": None, "qos": None, "nodes": 1, "gpus": 1, "cpus": 4,
            "mem": None,
            "time": "4:00:00", "constraint": None, "sbatch": [], "setup": [], "signal_delay": 120,
            "max_timeouts": 100, "array": True, "array_parallelism": 256, "local": False}


def minutes(text: str) -> int:
    """Slurm time limit (MINUTES, H:MM:SS, D-HH:MM:SS or D-HH) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"--time {text!r}: expected MINUTES, H:MM:SS or D-HH:MM:SS")
    days, a, b, c = match.groups()
    if days is None and b is None:
        total = int(a)  # MINUTES
    elif days is not None and b is None:
        total = int(a) * 60  # D-HH
    else:  # [D-]H:MM[:SS]
        total = int(a) * 60 + int(b) + (int(c) if c else 0) / 60
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
    params = {"job_name": job_name, "partition": options["partition"],
              "account": options["account"], "qos": options["qos"], "nodes": options["nodes"],
              "ntasks_per_node": 1, "gpus_per_node": options["gpus"] or None,
              "cpus_per_task": options["cpus"], "constraint": options["constraint"],
              "mem": _memory(options["mem"]),
              "time": minutes(options["time"]), "signal_delay_s": options["signal_delay"],
              "array_parallelism": options["array_parallelism"],
              "setup": [f"export PYTHONPATH={shlex.quote(str(PACKAGE_ROOT))}"
                        "${PYTHONPATH:+:$PYTHONPATH}", *options["setup"]],
              "additional_parameters": extra}
    return {k: v for k, v in params.items() if v is not None}


def _memory(gigabytes: Optional[float]) -> Optional[str]:
    """sbatch's --mem for a size in GB: whole GB, else MB."""
    if not gigabytes:
        return None
    return f"{int(gigabytes)}GB" if gigabytes == int(gigabytes) else f"{round(gigabytes * 1024)}MB"


def sbatch_script(options: dict[str, Any], folder: Path, rows: int = 1) -> str:
    """The sbatch script submitit writes for these options (a job array if rows > 1)."""
    python = shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    params = sbatch_parameters(options, "sparse-maml")
    return _make_sbatch_string(command=command, folder=folder,
                               map_count=rows if rows > 1 and options["array"] else None, **params)


def make_executor(options: dict[str, Any], folder: Path, job_name: str) -> submitit.Executor:
    """A Slurm executor (or submitit's local one with options['local']) for the options."""
    if options["local"]:
        executor = submitit.LocalExecutor(folder, max_num_timeout=options["max_timeouts"])
        executor.update_parameters(timeout_min=minutes(options["time"]),
                                   gpus_per_node=options["gpus"],
                                   signal_delay_s=options["signal_delay"],
                                   setup=sbatch_parameters(options, job_name)["setup"])
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=options["max_timeouts"])
    except RuntimeError as err:  # no srun on this machine
        raise SystemExit(f"slurm.py: {err} (use --local to run the rows on this machine)")
    params = sbatch_parameters(options, job_name)
    executor.update_parameters(**params)
    return executor


# ---------------------------------------------------------------------------------------------
# Rows


class Row:
    """One train.py command of the input: its name, run folder and jobs folder."""

    def __init__(self, command: list[str], cwd: Path):
        self.command, self.cwd = command, cwd
        if len(command) > 1 and command[1].endswith(".py") and not (cwd / command[1]).is_file():
            raise ValueError(f"no {command[1]} in {cwd}: run slurm.py from the repository root "
                             "(the jobs start the commands there)")
        self.run_dir = (cwd / run_dir_of(command)).resolve()
        names = [w.split("=", 1)[1] for w in command if w.startswith("run.name=")]
        self.name = names[-1] if names else self.run_dir.name
        self.folder = jobs_folder(self.run_dir)


def read_rows(lines: list[str], cwd: Path) -> tuple[list[Row], int]:
    """The rows of the input lines (blank lines and # comments skipped); a line that cannot be
    read is reported on stderr and skipped. Returns (rows, number of bad lines)."""
    rows, bad = [], 0
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rows.append(Row(shlex.split(line), cwd))
        except ValueError as err:
            print(f"slurm.py: input line {number} skipped: {err}", file=sys.stderr)
            bad += 1
    return rows, bad


def scheduler_states(entries: list[dict]) -> dict[str, Optional[str]]:
    """The scheduler's state of each recorded job that is still queued or running (None for the
    others: what became of them is read from the run folder and the job's result file)."""
    states: dict[str, Optional[str]] = {}
    queue = slurm_queue() if any(e["executor"] == "slurm" for e in entries) else {}
    if queue is None:
        print("slurm.py: squeue is not available: queued and running rows show as stopped",
              file=sys.stderr)
    for entry in entries:
        if entry["executor"] == "local":  # the job id is the local controller's process id
            states[entry["job_id"]] = "RUNNING" if _alive(int(entry["job_id"])) else None
        else:
            states[entry["job_id"]] = (queue or {}).get(entry["job_id"])
    return states


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (ended, not yet reaped by its parent) counts as ended
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def states_of(rows: list[Row]) -> list[tuple[Row, Optional[dict], Any]]:
    """(row, its newest job record or None, its RowState) for every row."""
    records = {}
    for folder in {row.folder for row in rows}:
        records.update(latest_jobs(folder))
    entries = [records.get(str(row.run_dir)) for row in rows]
    sched = scheduler_states([e for e in entries if e is not None])
    return [(row, entry, row_state(row.name, row.run_dir, entry,
                                   sched.get(entry["job_id"]) if entry else None))
            for row, entry in zip(rows, entries)]


def submit(rows: list[Row], options: dict[str, Any]) -> list[dict]:
    """Submit the rows (one job array per jobs folder unless options['array'] is off); returns
    the recorded entries, after printing each job id."""
    entries = []
    for folder in sorted({row.folder for row in rows}):
        group = [row for row in rows if row.folder == folder]
        template = folder / "%j"
        kind = "local" if options["local"] else "slurm"
        procs = max(options["gpus"], 1)  # train.py processes per node: one per GPU
        threads = max(1, options["cpus"] // procs)

        def job(row: Row) -> RowJob:
            return RowJob(row.name, row.command, str(row.cwd), threads, options["nodes"], procs)

        if options["array"] and len(group) > 1:
            executor = make_executor(options, template, "sparse-maml")
            with executor.batch():
                jobs = [executor.submit(job(row)) for row in group]
        else:
            jobs = []
            for row in group:
                executor = make_executor(options, template, row.name)
                jobs.append(executor.submit(job(row)))
        for row, job in zip(group, jobs):
            entry = {"name": row.name, "run_dir": str(row.run_dir), "job_id": str(job.job_id),
                     "executor": kind, "folder": str(template), "cwd": str(row.cwd),
                     "command": row.command, "options": options,
                     "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
            entries.append(entry)
            log = submitit.core.utils.JobPaths(template, job_id=entry["job_id"]).stdout
            print(f"submitted {row.name}: job {job.job_id} (log {log})", flush=True)
        record_jobs(folder, [e for e in entries if e["folder"] == str(template)])
    return entries


def print_table(states: list) -> None:
    """One line per row: name, state, job id, epoch, best validation accuracy, detail."""
    width = max([len(row.name) for row, _, _ in states] + [3])
    print(f"{'row':<{width}}  {'state':<11}  {'job':<12}  {'epoch':>5}  {'best val':>8}  detail")
    for row, _, s in states:
        epoch = "-" if s.epoch is None else str(s.epoch)
        best = "-" if s.best_val is None else f"{s.best_val:.2%}"
        print(f"{row.name:<{width}}  {s.state:<11}  {s.job_id:<12}  {epoch:>5}  {best:>8}  "
              f"{s.detail}".rstrip())
    counts: dict[str, int] = {}
    for _, _, s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    print(", ".join(f"{n} {state}" for state, n in counts.items()))


def cancel(states: list) -> int:
    """Cancel the jobs of queued, requeued and running rows (scancel; a local job's train.py gets
    SIGTERM, checkpoints and stops); returns the exit status."""
    ids = [entry["job_id"] for _, entry, s in states
           if entry and s.state in ("queued", "requeued", "running")
           and entry["executor"] == "slurm"]
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
    def children(parent: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        return found

    def cmdline(p: int) -> str:
        try:
            return Path(f"/proc/{p}/cmdline").read_text()
        except OSError:
            return ""

    todo, started = [pid], []
    while todo:
        for child in children(todo.pop()):
            if "submitit.core._submit" in cmdline(child):
                started += children(child)
            else:
                todo.append(child)
    return started


# ---------------------------------------------------------------------------------------------
# Command line


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    """The job options shared by submit and status --resubmit (default None: not given)."""
    g = parser.add_argument_group("job options (status --resubmit: those of the last submission "
                                  "unless given)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--qos", help="Slurm quality of service")
    g.add_argument("--nodes", type=int,
                   help="nodes per row (default 1); more than one runs train.py under torchrun "
                        "across them, the run folder on a file system every node sees")
    g.add_argument("--gpus", type=int,
                   help="GPUs per node (default 1; 0 for CPU jobs); more than one runs train.py "
                        "under torchrun, one process per GPU (outer.meta_batch_size must be a "
                        "multiple of nodes x GPUs)")
    g.add_argument("--cpus", type=int, help="CPUs per node, shared out as train.py's "
                                            "OMP_NUM_THREADS (default 4)")
    g.add_argument("--mem", type=float, help="memory per job in GB (default: the partition's)")
    g.add_argument("--time", help="time limit of each job, MINUTES or [D-]H:MM:SS (default "
                                  "4:00:00); a run longer than that continues in a requeued job")
    g.add_argument("--constraint", help="Slurm node constraint, e.g. a100")
    g.add_argument("--sbatch", action="append", metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch mail-type=FAIL (repeatable)")
    g.add_argument("--setup", action="append", metavar="LINE",
                   help="a shell line run before the job, e.g. 'source .venv/bin/activate' "
                        "(repeatable)")
    g.add_argument("--signal-delay", type=int,
                   help="seconds before the time limit at which the job is told to checkpoint "
                        "(default 120)")
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
    what.add_argument("--cancel", action="store_true",
                      help="cancel queued and running rows (a local row: its train.py stops at a "
                           "checkpoint)")
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
        rows, bad = read_rows(lines, Path.cwd())
    except ValueError as err:
        print(f"slurm.py: {err}", file=sys.stderr)
        return 2
    if not rows:
        print("slurm.py: no train.py commands in the input", file=sys.stderr)
        return 1

    if args.action == "submit" and args.print_sbatch:
        print(sbatch_script(options, rows[0].folder / "%j", len(rows)))
        return 1 if bad else 0
    states = states_of(rows)
    if args.action == "status" and not args.resubmit:
        print_table(states)
        status = cancel(states) if args.cancel else 0
        return 1 if bad else status

    wanted = {"failed", "stopped"} if args.action == "status" else {"failed", "stopped",
                                                                      "not started"}
    todo = []
    for row, entry, state in states:
        if state.state in wanted:
            todo.append((row, entry))
        elif args.action == "submit":
            print(f"{row.name}: {state.state} (job {state.job_id}), not submitted")
    if not todo:
        print("nothing to submit")
        return 1 if bad else 0
    # Rows submitted before keep their recorded options unless new ones are given.
    groups: dict[str, tuple[dict[str, Any], list[Row]]] = {}
    for row, entry in todo:
        recorded = entry.get("options") if entry and args.action == "status" else None
        row_options = options_from(args, recorded)
        groups.setdefault(repr(sorted(row_options.items())), (row_options, []))[1].append(row)
    for row_options, group in groups.values():
        submit(group, row_options)
    return 1 if bad else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly
    sys.exit(main())
