"""utils/benchmark.py runs and prints one row per configuration and implementation."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(?P<config>.+?)\s+(?P<impl>reference|loop|vmap|compiled)\s+(?P<rate>[\d.]+)\s+"
                 r"(?P<ratio>[\d.]+)\s+(?P<compile>[\d.]+|-)\s+(?P<peak>[\d.]+)$")


def test_benchmark_prints_a_row_per_implementation_with_compile_time_and_memory():
    result = subprocess.run([sys.executable, str(ROOT / "utils" / "benchmark.py"), "--device", "cpu",
                             "--shapes", "tiny", "--configs", "conv4-w4 sparse-MAML 1-shot",
                             "--warmup", "1", "--rounds", "1"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("device: CPU")
    assert "USDT:" not in result.stdout + result.stderr  # the profiler's native chatter is silenced
    rows = {m["impl"]: m for m in map(ROW.match, result.stdout.splitlines()) if m}
    assert set(rows) == {"reference", "loop", "vmap", "compiled"}
    assert rows["reference"]["ratio"] == "1.00"
    assert float(rows["compiled"]["compile"]) > 0  # the compiled row reports its compile time
    assert all(rows[i]["compile"] == "-" for i in ("reference", "loop", "vmap"))
    assert all(float(row["peak"]) > 0 for row in rows.values())


def test_benchmark_refuses_an_unknown_configuration():
    result = subprocess.run([sys.executable, str(ROOT / "utils" / "benchmark.py"), "--device", "cpu",
                             "--shapes", "tiny", "--configs", "no such row"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "no such row" in result.stderr and "conv4-w4 sparse-MAML 1-shot" in result.stderr
