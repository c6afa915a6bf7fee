"""Run independent commands (seed and hyper-parameter sweeps) on a machine's GPUs, one per GPU.

    ./run_sparse_MAML.sh --dry-run --seeds 4 sparse_maml_conv4_5shot | python utils/sweep.py
    python utils/sweep.py --gpus 0,1,2,3 commands.txt       # these GPUs, one run each at a time
    python utils/sweep.py --jobs 2 commands.txt             # CPU only: two runs at a time

Commands are read one per line (shell quoting as `run_sparse_MAML.sh --dry-run` prints it; blank
lines and `#` comments are skipped) from the files given, or from stdin. Each GPU runs one command
at a time with CUDA_VISIBLE_DEVICES set to it, so `run.device=auto` in the run means that GPU; the
next command starts as soon as a GPU is free. Without GPUs (or with `--gpus none`) the commands run
`--jobs` at a time. Each command's output goes to <logs>/<number>.log. The exit status is 1 if any
command failed (the others still run). SIGTERM or Ctrl-C reaches the running commands (train.py
then checkpoints and exits 3, resumable) and no new command starts.
"""

from __future__ import annotations

import argparse
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Optional


def read_commands(lines: Iterable[str]) -> list[list[str]]:
    """Non-empty, non-comment lines, split as a shell would."""
    commands = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line))
    return commands


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
        found = visible_gpus()
        return list(found) if found else [None] * jobs
    if gpus == "none":
        return [None] * jobs
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids:
        raise ValueError(f"--gpus {gpus!r}: expected auto, none or a list such as 0,1,2,3")
    return ids


class Sweep:
    """A queue of commands drained by one worker thread per slot."""

    def __init__(self, commands: list[list[str]], slots: list[Optional[str]], logs: Path):
        self.todo: queue.Queue = queue.Queue()
        for number, command in enumerate(commands, 1):
            self.todo.put((number, command))
        self.slots, self.logs = slots, logs
        self.failed: list[int] = []
        self.running: dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.lock = threading.Lock()

    def _worker(self, gpu: Optional[str]) -> None:
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        where = f"gpu {gpu}" if gpu is not None else "cpu"
        while not self.stopping:
            try:
                number, command = self.todo.get_nowait()
            except queue.Empty:
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
            if status != 0:
                with self.lock:
                    self.failed.append(number)
            print(f"[{where}] {'done' if status == 0 else f'FAILED (status {status})'} {number} "
                  f"after {time.time() - start:.0f} s", flush=True)

    def stop(self, signum: int) -> None:
        """Start nothing more and pass `signum` to the running commands."""
        self.stopping = True
        with self.lock:
            for proc in self.running.values():
                proc.send_signal(signum)

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
    if args.files:
        lines = [line for name in args.files for line in Path(name).read_text().splitlines()]
    else:
        lines = sys.stdin.read().splitlines()
    commands = read_commands(lines)
    if not commands:
        print("sweep: no commands to run", file=sys.stderr)
        return 0
    sweep = Sweep(commands, slots, Path(args.logs))

    def on_signal(signum: int, frame) -> None:
        if signum == signal.SIGTERM:
            sweep.stop(signal.SIGTERM)
        else:  # Ctrl-C: the terminal has signalled the commands (same process group) already
            sweep.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = (", ".join(f"gpu {g}" for g in slots) if slots[0] is not None
             else f"{len(slots)} cpu slots")
    print(f"sweep: {len(commands)} commands on {where}", flush=True)
    failed = sweep.run()
    if failed:
        print(f"sweep: {len(failed)} of {len(commands)} failed: {failed} (logs in {args.logs})",
              file=sys.stderr)
        return 1
    print(f"sweep: all {len(commands)} commands finished (logs in {args.logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
