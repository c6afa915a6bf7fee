#!/usr/bin/env bash
# Every GPU check in one call, for a machine with one CUDA device (about 8 minutes on an H100/H200):
#   1. tests/test_cuda.py: a debug run end to end and an exact resume on CUDA, on-device episodes,
#      compiled == reference over several steps (with and without CUDA graphs, with deterministic
#      and non-deterministic cuDNN), bf16 autocast within the fp32 run's interval;
#   2. utils/benchmark.py at the paper's shapes: tasks/s of every implementation side by side, the
#      ratio to the reference loop, compile time and peak memory, with the GPU named.
#
#   bash utils/gpu_check.sh                      # both
#   bash utils/gpu_check.sh --rounds 9           # extra arguments go to the benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device visible to torch")
print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; CUDA {torch.version.cuda}")
PY
python -m pytest -q -p no:cacheprovider tests/test_cuda.py
python utils/benchmark.py --device cuda --shapes paper "$@"
