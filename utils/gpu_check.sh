#!/usr/bin/env bash
# Every GPU check in one call, for a machine with one CUDA device (aimed at under 8 minutes on an
# H100/H200 with a warm compile cache; not yet timed on one):
#   1. tests/test_cuda.py: a debug run end to end and an exact resume on CUDA, on-device episodes,
#      compiled == reference over several steps (with and without CUDA graphs, with deterministic
#      and non-deterministic cuDNN), bf16 autocast within the fp32 run's interval;
#   2. utils/benchmark.py at the paper's shapes: tasks/s of every implementation side by side, the
#      ratio to the reference loop, compile time and peak memory, with the GPU named.
#
#   bash utils/gpu_check.sh                      # both
#   bash utils/gpu_check.sh tests                # only the CUDA tests
#   bash utils/gpu_check.sh benchmark --rounds 9 # only the benchmark (extra arguments go to it)
# A cold compile cache adds several minutes: split the two parts when a call has a time limit.
set -euo pipefail
part=all
if [[ "${1:-}" == tests || "${1:-}" == benchmark ]]; then part=$1; shift; fi
cd "$(dirname "$0")/.."
# The checkout's package, also where `pip install -r requirements.txt` has not been run (a GPU
# machine with its own torch).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device visible to torch")
print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; CUDA {torch.version.cuda}")
PY
if [[ $part != benchmark ]]; then python -m pytest -q -p no:cacheprovider tests/test_cuda.py; fi
if [[ $part != tests ]]; then python utils/benchmark.py --device cuda --shapes paper "$@"; fi
