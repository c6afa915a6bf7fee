"""Device resolution, seeding and confidence intervals: the small helpers every entry point needs."""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available else cpu; cuda[:i] must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name} but CUDA is not available; use run.device=cpu")
    return device


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
