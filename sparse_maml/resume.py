"""Opening a run: a new run folder, or an existing run continued from its newest checkpoint.

Only rank 0 writes, holding the folder's lock (run_lock.py, released by the log's close()); every
process builds the same state. Nothing in the folder is changed before the checkpoint has been
found to fit the config the run continues with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpoint, distributed
from .config import Config
from .experiment import Experiment, build_experiment
from .run_folder import (CONFIG, WRITTEN, check_existing_run, make_folder, make_run_dir,
                         new_run_dir, remove_stale_temporaries, write_config)
from .provenance import record_provenance
from .run_lock import RunLock
from .run_log import NullRunLog, RunLog

Report = Callable[[str], None]


def open_run(config: Config, device: torch.device, resume_dir: Optional[Path] = None,
             report: Report = print) -> tuple[Experiment, Path, RunLog | NullRunLog]:
    """The experiment, its run folder and its log: a new run, or the run in `resume_dir` restored
    from its newest loadable checkpoint. Only rank 0 writes, holding the folder's lock (released by
    the log's close()); every process builds the same state."""
    main_process = distributed.is_main_process()
    if resume_dir is None:
        run_dir = distributed.on_main(new_run_dir, config)  # rank 0 picks the time-stamped name
        try:
            exp = build_experiment(config, device)  # data errors surface before the folder is written
        except BaseException:
            if main_process and not config.run.dir:
                _remove_if_empty(run_dir)
            raise
        lock = None
        if main_process:
            make_folder(run_dir, exist_ok=True)
            lock = RunLock(run_dir, report).acquire()
        try:
            distributed.on_main(make_run_dir, config, run_dir)  # refuses a used folder, under the lock
            if not main_process:
                return exp, run_dir, NullRunLog()
            record_provenance(run_dir, "start", exp.device)
            return exp, run_dir, RunLog(run_dir, config.run.tensorboard, lock=lock, config=config)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    check_existing_run(config, resume_dir)  # a clear message for a folder that holds no run
    lock = RunLock(resume_dir, report).acquire() if main_process else None
    try:
        return _open_existing(config, device, resume_dir, lock, report)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _remove_if_empty(folder: Path) -> None:
    """Remove a run folder made for a run that failed before writing anything."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _open_existing(config: Config, device: torch.device, resume_dir: Path, lock: Optional[RunLock],
                   report: Report) -> tuple[Experiment, Path, RunLog | NullRunLog]:
    """open_run for a run folder that already holds the run, its lock taken."""
    main_process = distributed.is_main_process()
    changes = check_existing_run(config, resume_dir)  # again, under the lock; nothing touched yet
    if main_process:  # only temporaries of files the run recorded (a record-less older run: *.pt)
        if (resume_dir / WRITTEN).is_file():
            remove_stale_temporaries(resume_dir)
        else:
            checkpoint.remove_stale_temporaries(resume_dir)
    found = checkpoint.load_latest(resume_dir)  # every process reads the same checkpoint
    if found is not None:
        path, saved = found
        checkpoint.check_against_checkpoint(config, saved, path)
    exp = build_experiment(config, device)
    if found is not None:
        checkpoint.restore_checkpoint(exp, saved, path)
    distributed.barrier()  # all have read the checkpoints before rank 0 writes anything
    if main_process:  # only once the checkpoint fits the new config
        write_config(config, resume_dir / CONFIG)
    for key, (old, new) in changes.items():
        if key != "run.dir":
            report(f"resume: {key}: {old!r} -> {new!r}")
    if not main_process:
        return exp, resume_dir, NullRunLog()
    record_provenance(resume_dir, "start" if found is None else "resume", exp.device)
    if found is None:
        report(f"{resume_dir} holds no checkpoint yet: starting it from the beginning")
        log = RunLog(resume_dir, config.run.tensorboard, truncate_to=0, purge_step=0, lock=lock,
                     config=config)
    else:
        report(f"resuming {resume_dir} from {path.name}: {exp.state.epoch} epochs and "
               f"{exp.state.step} meta-batches done")
        log = RunLog(resume_dir, config.run.tensorboard, truncate_to=saved["metrics_bytes"],
                     purge_step=exp.state.step + 1, lock=lock, config=config)
    if log.dropped:
        kinds = sorted({str(r.get("kind")) for r in log.dropped})
        report(f"resume: dropped {len(log.dropped)} records of metrics.jsonl written after the "
               f"checkpoint ({', '.join(kinds)}); the resumed run writes them again")
    if log.kept:
        report(f"resume: kept {len(log.kept)} test.py records written after the checkpoint")
    return exp, resume_dir, log
