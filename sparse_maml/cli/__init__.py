"""The command lines (train.py, test.py and the sparse-maml-* entry points): what they share is
how an expected failure becomes a one-line message and an exit status, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable

import torch

from .. import distributed
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError
from ..run_lock import RunLocked
from ..runtime import error_message

EXIT_INTERRUPTED = 130  # Ctrl-C outside training (the shell's 128 + SIGINT)
# A user's mistake or a received file that is refused: a message, exit status 1.
EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, RunLocked, OSError, MemoryError,
                   torch.OutOfMemoryError)


def lead() -> bool:
    """Whether this process reports: rank 0 under torchrun (every rank fails alike), else yes."""
    return distributed.env_rank() == 0


def run_command(run: Callable[[], int]) -> int:
    """run(), with each expected failure printed on stderr (by the lead process) as exit 1, and
    Ctrl-C as exit 130."""
    try:
        distributed.check_environment()  # before RANK is trusted to decide who reports
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as err:
        if lead():
            print(f"error: {error_message(err)}", file=sys.stderr, flush=True)
        return 1


def print_sparsity(sparsity: dict[str, float]) -> None:
    """Per-layer mask sparsity as a small table."""
    if not sparsity:
        return
    layers = {name: value for name, value in sparsity.items() if name != "mean"}
    print("mask sparsity (fraction of weights with inner-loop learning off):")
    width = max(map(len, layers))
    for name, value in [*layers.items(), ("all masked weights", sparsity["mean"])]:
        print(f"  {name:<{width}}  {value:6.1%}")
