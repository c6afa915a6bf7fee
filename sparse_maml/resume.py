"""Opening a run: a new run folder, or an existing run continued from its newest checkpoint.

Only rank 0 writes, holding the folder's lock (run_lock.py, released by the log's close()); every
process builds the same state. Nothing in the folder is changed before the checkpoint has been
found to fit the config the run continues with.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint, distributed
from .config import Config
from .experiment import Experiment, build_experiment
from .run_folder import (CONFIG, WRITTEN, check_existing_run, make_folder, make_run_dir,
                         new_run_dir, remove_stale_temporaries, write_config)
from .provenance import record_provenance
from .run_lock import RunLock
from .run_log import NullRunLog, RunLog


def open_run(config: Config, device: torch.device, resume_dir: Optional[Path] = None
             ) -> tuple[Experiment, Path, RunLog | NullRunLog]:
    """The experiment, its run folder and its log: a new run, or the run in `resume_dir` restored
    from its newest loadable checkpoint."""
    main_process = distributed.is_main_process()
    if resume_dir is None:
        run_dir = distributed.on_main(new_run_dir, config)  # rank 0 picks the time-stamped name
        try:
            exp = build_experiment(config, device)  # data errors surface before anything is written
        except BaseException:
            if main_process and not config.run.dir:  # remove the folder made for this run
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise
        if main_process:
            make_folder(run_dir, exist_ok=True)
    else:
        run_dir = resume_dir
        check_existing_run(config, resume_dir)  # a clear message for a folder that holds no run
    lock = RunLock(run_dir).acquire() if main_process else None
    try:
        if resume_dir is not None:
            return _open_existing(config, device, resume_dir, lock)
        distributed.on_main(make_run_dir, config, run_dir)  # refuses a used folder, under the lock
        if not main_process:
            return exp, run_dir, NullRunLog()
        record_provenance(run_dir, "start", exp.device)
        return exp, run_dir, RunLog(run_dir, config.run.tensorboard, lock=lock, config=config)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _open_existing(config: Config, device: torch.device, resume_dir: Path, lock: Optional[RunLock]
                   ) -> tuple[Experiment, Path, RunLog | NullRunLog]:
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
            print(f"resume: {key}: {old!r} -> {new!r}")
    if not main_process:
        return exp, resume_dir, NullRunLog()
    record_provenance(resume_dir, "start" if found is None else "resume", exp.device)
    if found is None:
        print(f"{resume_dir} holds no checkpoint yet: starting it from the beginning")
        truncate_to, purge_step = 0, 0
    else:
        print(f"resuming {resume_dir} from {path.name}: {exp.state.epoch} epochs and "
              f"{exp.state.step} meta-batches done")
        truncate_to, purge_step = saved["metrics_bytes"], exp.state.step + 1
    log = RunLog(resume_dir, config.run.tensorboard, truncate_to=truncate_to,
                 purge_step=purge_step, lock=lock, config=config)
    if log.dropped:
        kinds = sorted({str(r.get("kind")) for r in log.dropped})
        print(f"resume: dropped {len(log.dropped)} records of metrics.jsonl written after the "
              f"checkpoint ({', '.join(kinds)}); the resumed run writes them again")
    if log.kept:
        print(f"resume: kept {len(log.kept)} test.py records written after the checkpoint")
    return exp, resume_dir, log
