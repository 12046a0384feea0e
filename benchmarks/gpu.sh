#!/usr/bin/env bash
# The prepared GPU check (one H100/H200-class GPU, under 8 minutes, nothing downloads):
#   1. every GPU-marked test under tests/ (mixed-precision training with every term on, the
#      CUDA render against the CPU one, the inductor-compiled pixel path against eager),
#   2. benchmarks/gpu_bench.py: train-step samples/s, peak memory and MFU at 512 px in bf16
#      with SD 1.5 shapes, eager: research at batch 8 and the largest that fits (up to 32),
#      its speed levers at batch 8 (the pixel path sample by sample as before issue 32,
#      chunks of 4 and 2, decoder and critics in NCHW, GroupNorm in fp32 as autocast runs
#      it, LPIPS on decoder features), latent_only and fast at batch 8 and their largest; a
#      profile of one research micro-step (the ops with the most GPU time); research with its
#      pixel path compiled at batch 8 (compile time in compile_s); then latent_only compiled
#      (inductor needs over 2 minutes for UNet + ControlNet: the budget may skip it, and says
#      so); last SDXL-base shapes at 1024 px (random weights, both text encoders, bf16):
#      latent_only and research at batch 1-4, if the budget leaves time. Memory capped at
#      80 GB (an H100's) so the largest batch answers for it.
# Results land in $OUT (default benchmarks/out): gpu_tests.txt, gpu_bench.log and
# <date>-<gpu>.json, which a GPU run also copies to benchmarks/results/ (commit it there).
#   benchmarks/gpu.sh            # on the GPU machine
#   benchmarks/gpu.sh --dry-run  # the same code on the CPU, tiny shapes, under 3 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DRY=()
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
gpu=$(echo "${gpu:-cpu}" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); gpu=cpu-dry-run; fi
json="$OUT/$(date -u +%F)-$gpu.json"

start=$SECONDS
# The GPU tests skip themselves without CUDA; a failure is recorded, the benchmark still runs.
timeout 180 "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider --continue-on-collection-errors \
  >"$OUT/gpu_tests.txt" 2>&1 || echo "gpu tests: exit $?" >>"$OUT/gpu_tests.txt"
tail -n 3 "$OUT/gpu_tests.txt"
# What is left of the 8 minutes, less a minute of margin, is the benchmark's budget.
budget=$(( 420 - (SECONDS - start) - 60 ))
# The research recipe and its levers first: what the budget skips comes last.
levers=research_per_sample,research_chunk4,research_nchw_decoder,research_nchw
levers=$levers,research_norm_fp32,research_latent_lpips,research_chunk2
timeout $(( budget + 60 )) "$PY" benchmarks/gpu_bench.py "${DRY[@]}" --budget-s "$budget" \
  --memory-gb 80 --max-batch-cap 32 --variants "research,$levers,latent_only,fast" \
  --largest-variants latent_only,fast,research --profile research \
  --compile-pixel-variants research --compile-variants latent_only \
  --sdxl-variants latent_only,research --sdxl-batches 1,2,3,4 \
  --out "$json" >"$OUT/gpu_bench.log" 2>&1 || echo "gpu_bench: exit $?" >>"$OUT/gpu_bench.log"
tail -n 1 "$json" || true
if [[ ${#DRY[@]} -eq 0 ]]; then mkdir -p benchmarks/results && cp "$json" benchmarks/results/; fi
echo "gpu.sh: $json, done in $(( SECONDS - start )) s"
