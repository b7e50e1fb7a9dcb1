#!/usr/bin/env bash
# One prepared GPU check: the CUDA tests, then the GPU speed benchmark, under one global timeout.
#
#   make gpu-check                       # or: scripts/gpu_check.sh
#   GPU_CHECK_OUT=dir GPU_CHECK_TIMEOUT=480 PYTHON=python3 scripts/gpu_check.sh
#
# Writes to $GPU_CHECK_OUT (default build/gpu-check): device.txt (nvidia-smi), tests.txt (pytest
# -m gpu), speed.txt (the table and the targets, to paste into docs/performance.md), speed.json.
# Designed for <= 8 minutes on one modern GPU (the timeout stops it there); without CUDA it
# says so and exits 0 without running anything.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${GPU_CHECK_OUT:-build/gpu-check}"
TOTAL="${GPU_CHECK_TIMEOUT:-480}"   # seconds for everything
TESTS_MAX=150                       # of which at most this for the tests
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
start=$(date +%s)

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu-check skipped: no CUDA device visible to $PY (torch.cuda.is_available() is False)"
  exit 0
fi
{ nvidia-smi 2>&1 || true; "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; } > "$OUT/device.txt"
head -n 20 "$OUT/device.txt" | tail -n 1

echo "== gpu tests (at most ${TESTS_MAX}s) =="
timeout -k 10 "$TESTS_MAX" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests.txt" | tail -n 15
tests_rc=${PIPESTATUS[0]}

left=$(( TOTAL - ( $(date +%s) - start ) - 10 ))
echo "== gpu speed benchmark (at most ${left}s) =="
timeout -k 10 "$left" "$PY" -m emaweights.bench.speed --device cuda \
  --models resnet50,vit_b16,vit_b16_bf16,flat1b --rounds 5 --reps 10 --batch 64 \
  --json "$OUT/speed.json" 2>&1 | tee "$OUT/speed.txt"
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc, benchmark rc=$bench_rc (124: timed out), $(( $(date +%s) - start ))s; files in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
