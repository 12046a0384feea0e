#!/usr/bin/env bash
# The prepared GPU check (one H100/H200-class GPU, under 8 minutes, nothing downloads):
#   1. every GPU-marked test under tests/ (mixed-precision training with every term on, the
#      CUDA render against the CPU one),
#   2. benchmarks/gpu_bench.py: train-step samples/s, peak memory and MFU at 512 px in bf16
#      with SD 1.5 shapes, latent_only / fast / research, batch 8 and the largest that fits
#      (up to 32), eager; a profile of one research micro-step (the ops with the most GPU
#      time); then latent_only compiled (inductor needs over 2 minutes for UNet + ControlNet);
#      memory capped at 80 GB (an H100's) so the largest batch answers for it.
# Results land in $OUT (default benchmarks/out): gpu_tests.txt and gpu_bench.json.
#   benchmarks/gpu.sh            # on the GPU machine
#   benchmarks/gpu.sh --dry-run  # the same code on the CPU, tiny shapes, under 3 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); fi

start=$SECONDS
# The GPU tests skip themselves without CUDA; a failure is recorded, the benchmark still runs.
timeout 150 "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider \
  >"$OUT/gpu_tests.txt" 2>&1 || echo "gpu tests: exit $?" >>"$OUT/gpu_tests.txt"
tail -n 3 "$OUT/gpu_tests.txt"
# What is left of the 8 minutes, less a minute of margin, is the benchmark's budget.
budget=$(( 420 - (SECONDS - start) - 60 ))
timeout $(( budget + 60 )) "$PY" benchmarks/gpu_bench.py "${DRY[@]}" --budget-s "$budget" --memory-gb 80 --max-batch-cap 32 \
  --variants latent_only,fast,research --compile-variants latent_only --profile research \
  --out "$OUT/gpu_bench.json" >"$OUT/gpu_bench.log" 2>&1
tail -n 1 "$OUT/gpu_bench.json"
echo "gpu.sh: done in $(( SECONDS - start )) s"
