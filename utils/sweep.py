"""Run independent commands (seed and hyper-parameter sweeps) on a machine's GPUs, one per GPU.

    ./run_sparse_MAML.sh --dry-run --seeds 4 sparse_maml_conv4_5shot | python utils/sweep.py
    python utils/sweep.py --gpus 0,1,2,3 commands.txt       # these GPUs, one run each at a time
    python utils/sweep.py --jobs 2 commands.txt             # CPU only: two runs at a time

Commands are read one per line (shell quoting, as `run_sparse_MAML.sh --dry-run` prints them;
blank lines and `#` comments skipped) from the files given, or stdin. Each GPU runs one command at
a time with CUDA_VISIBLE_DEVICES set to it, the next starting as soon as a GPU is free; without
GPUs (or with `--gpus none`) `--jobs` run at a time. Each command gets OMP_NUM_THREADS = cores //
concurrent commands unless it is set (torch's thread per core in every command oversubscribes the
machine) and writes <logs>/<number>.log. The exit status is 1 if a command failed or a line could
not be split as a shell would (the others still run). SIGTERM or Ctrl-C reaches the running
commands (train.py checkpoints and exits 3), no new one starts, those never started are listed,
and the exit status is 3. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

EXIT_STOPPED = 3  # train.py: stopped at a checkpoint on a signal, resumable
T = TypeVar("T")


def command_lines(files: list[str]) -> list[str]:
    """The lines of `files`, or of standard input when none is named (OSError names the file)."""
    if files:
        return [line for name in files for line in Path(name).read_text().splitlines()]
    return sys.stdin.read().splitlines()


def read_commands(lines: Iterable[str], parse: Callable[[str], T] = shlex.split,
                  ) -> tuple[list[T], list[tuple[int, str, ValueError]]]:
    """parse(line) (by default: split as a shell would) of each line that is not blank or a #
    comment; and (number, line, error) of each line whose parse raised a ValueError (an unclosed
    quote), which is left out."""
    commands, bad = [], []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                commands.append(parse(line))
            except ValueError as err:
                bad.append((number, line, err))
    return commands, bad


def thread_share(slots: int) -> int:
    """Intra-op threads for each of `slots` concurrent commands: the usable cores shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // slots)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def parse_slots(gpus: str, jobs: int) -> list[Optional[str]]:
    """One entry per concurrent run: a GPU id, or None for a CPU slot."""
    if gpus == "auto":
        return visible_gpus() or [None] * jobs
    if gpus == "none":
        return [None] * jobs
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids:
        raise ValueError(f"--gpus {gpus!r}: expected auto, none or a list such as 0,1,2,3")
    return ids


class Sweep:
    """A queue of commands drained by one worker thread per slot."""

    def __init__(self, commands: list[list[str]], slots: list[Optional[str]], logs: Path,
                 threads: Optional[int] = None):
        self.todo = deque(enumerate(commands, 1))  # its pops are thread-safe
        self.slots, self.logs, self.threads = slots, logs, threads
        self.failed: list[int] = []
        self.stopped: list[int] = []
        self.running: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.lock = threading.Lock()

    def _worker(self, gpu: Optional[str]) -> None:
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        where = f"gpu {gpu}" if gpu is not None else "cpu"
        while not self.stopping:
            try:
                number, command = self.todo.popleft()
            except IndexError:
                return
            log_path = self.logs / f"{number}.log"
            print(f"[{where}] start {number}: {shlex.join(command)}  (log {log_path})", flush=True)
            start = time.time()
            with open(log_path, "w") as log:
                try:
                    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                except OSError as err:
                    log.write(f"cannot start: {err}\n")
                    status = 127
                else:
                    with self.lock:
                        self.running[number] = proc
                    status = proc.wait()
                    with self.lock:
                        del self.running[number]
            stopped = status == EXIT_STOPPED and self.stopping
            if status != 0:
                with self.lock:
                    (self.stopped if stopped else self.failed).append(number)
            outcome = ("done" if status == 0 else "stopped at a checkpoint (resumable)" if stopped
                       else f"FAILED (status {status})")
            print(f"[{where}] {outcome} {number} after {time.time() - start:.0f} s", flush=True)

    def stop(self, signum: int) -> None:
        """Start nothing more and pass `signum` to the running commands."""
        self.stopping = True
        with self.lock:
            for proc in self.running.values():
                proc.send_signal(signum)

    def not_started(self) -> list[tuple[int, list[str]]]:
        """(number, command) of the commands still waiting (after a stop: never started)."""
        return list(self.todo)

    def run(self) -> list[int]:
        """Run every command; returns the numbers of those that failed."""
        self.logs.mkdir(parents=True, exist_ok=True)
        workers = [threading.Thread(target=self._worker, args=(gpu,), daemon=True)
                   for gpu in self.slots]
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)  # wake up now and then so signal handlers run
        return sorted(self.failed)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("files", nargs="*", help="files of commands, one per line (default: stdin)")
    parser.add_argument("--gpus", default="auto",
                        help="auto (CUDA_VISIBLE_DEVICES or every GPU torch sees; CPU if none), "
                             "none, or ids such as 0,1,2,3: one command per GPU at a time")
    parser.add_argument("--jobs", type=int, default=1,
                        help="commands at a time without GPUs (default 1)")
    parser.add_argument("--logs", default="runs/sweep-logs", help="folder of the per-command logs")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        slots = parse_slots(args.gpus, args.jobs)
    except ValueError as err:
        parser.error(str(err))
    try:
        lines = command_lines(args.files)
    except OSError as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 1
    commands, bad = read_commands(lines)
    for number, line, err in bad:
        print(f"sweep: line {number} skipped ({err}): {line}", file=sys.stderr)
    if not commands:
        print("sweep: no commands to run", file=sys.stderr)
        return 1 if bad else 0
    threads = None if "OMP_NUM_THREADS" in os.environ else thread_share(len(slots))
    sweep = Sweep(commands, slots, Path(args.logs), threads)

    def on_signal(signum: int, frame) -> None:
        if signum == signal.SIGTERM:
            sweep.stop(signal.SIGTERM)
        else:  # Ctrl-C: the terminal has signalled the commands (same process group) already
            sweep.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = (", ".join(f"gpu {g}" for g in slots) if slots[0] is not None
             else f"{len(slots)} cpu slots")
    share = (f"{threads} thread(s) each (OMP_NUM_THREADS)" if threads is not None
             else f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} as set")
    print(f"sweep: {len(commands)} commands on {where}, {share}", flush=True)
    failed = sweep.run()
    if bad:
        print(f"sweep: {len(bad)} input line(s) skipped (see above)", file=sys.stderr)
    if failed:
        print(f"sweep: {len(failed)} of {len(commands)} failed: {failed} (logs in {args.logs})",
              file=sys.stderr)
    if sweep.stopping:
        waiting = sweep.not_started()
        print(f"sweep: stopped; {len(sweep.stopped)} stopped at a checkpoint {sweep.stopped}, "
              f"{len(waiting)} never started{':' if waiting else ''}", file=sys.stderr)
        for number, command in waiting:
            print(f"  {number}: {shlex.join(command)}", file=sys.stderr)
        return EXIT_STOPPED
    if failed:
        return 1
    print(f"sweep: all {len(commands)} commands finished (logs in {args.logs})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
