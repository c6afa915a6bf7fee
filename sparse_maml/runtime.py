"""The process: device resolution, seeding, confidence intervals, and the CPU's threads and
allocator for running tasks in parallel."""

from __future__ import annotations

import ctypes
import functools
import math
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available else cpu; cuda[:i] must exist (else ConfigError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but CUDA is not available on this machine; use "
                          "run.device=cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"run.device={name} but this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    return device


def error_message(err: BaseException) -> str:
    """What an entry point prints for an error: the message alone. An error raised in a DataLoader
    worker comes back with the worker's traceback in its message; only its last line is kept."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        match = re.match(r"[\w.]+: (.*)", last)
        text = f"{match.group(1) if match else last} (in a DataLoader worker)"
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return text


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA); optionally request deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def mean_confidence_interval(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% interval: 1.96 * std / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values to average")
    if values.size == 1:
        return float(values[0]), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def keep_freed_memory() -> None:
    """glibc's malloc: stop giving freed memory back to the OS after every task.

    By default glibc trims a thread's heap as soon as a task's activations are freed, so the next
    task page-faults them in again; on worker threads this cost the compiled step 15-20% (2-core
    CPU, measured). Fixed thresholds (large blocks from the heap up to 32 MiB, trim beyond 64 MiB
    free) keep the memory. No effect where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD


@functools.cache
def task_pool(workers: int) -> ThreadPoolExecutor:
    """`workers` threads for the tasks of a meta-batch on CPU, each with one intra-op thread."""
    keep_freed_memory()
    caller_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="compiled-task")
    all_started = threading.Barrier(workers)  # so that each call below gets its own thread

    def use_one_intra_op_thread() -> None:
        # A thread takes the process's count at its first use of torch's thread pool, which would
        # undo a setting made before it: use it first, then set one thread.
        torch.get_num_threads()
        torch.set_num_threads(1)
        all_started.wait()

    for future in [pool.submit(use_one_intra_op_thread) for _ in range(workers)]:
        future.result()
    # set_num_threads also set the count that threads started later begin with: restore it
    torch.set_num_threads(caller_threads)
    return pool
