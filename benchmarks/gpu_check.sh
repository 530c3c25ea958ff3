#!/usr/bin/env bash
# ONNX export + check on a GPU machine: torch on CUDA vs onnxruntime's CUDA provider (ORT CPU if the installed
# onnxruntime has no CUDA provider; onnxruntime-gpu cannot be pip-installed offline). Prints the card and what
# is available, then one table row per zoo model. Usage: benchmarks/gpu_check.sh [--models bert gpt2 ...]
set -uo pipefail
cd "$(dirname "$0")/.."

# A python that has torch: the repo's venv if it was carried along, else the system one.
PY=""
for cand in .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
    echo "no python with torch found"; command -v nvidia-smi >/dev/null && nvidia-smi -L; exit 2
fi
echo "== $(date -u +%FT%TZ) $(hostname) python: $(command -v "$PY")"
command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "nvidia-smi: not found"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TRANSFORMERS_VERBOSITY=error PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py "$@"
