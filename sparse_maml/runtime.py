"""Device resolution, seeding and confidence intervals: the small helpers every entry point needs."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available else cpu; cuda[:i] must exist (else ConfigError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but CUDA is not available on this machine; use "
                          "run.device=cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
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
