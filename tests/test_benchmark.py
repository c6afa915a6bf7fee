"""utils/benchmark.py runs and prints one row per configuration and implementation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_prints_a_row_per_config_and_implementation():
    result = subprocess.run([sys.executable, str(ROOT / "utils" / "benchmark.py"), "--device", "cpu",
                             "--shapes", "tiny", "--warmup", "1", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines()
            if re.search(r"\s(reference|loop|vmap)\s+[\d.]+\s+[\d.]+\s+[\d.]+$", line)]
    assert len(rows) == 6
    assert all(" 1.00 " in row for row in rows if " reference " in row)
    assert result.stdout.startswith("device: CPU")
