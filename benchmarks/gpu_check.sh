#!/usr/bin/env bash
# The GPU measurement as one script, for the device machine (torch there, Ray etc. from ../shared/tools/gpu-bundle.sh):
#
#   here:    make .venv && bash ../shared/tools/gpu-bundle.sh && TINY=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh
#   device:  bash benchmarks/gpu_check.sh          (writes every JSON line under $OUT, default ./gpu-out)
#
# 1. the training step alone: fp32 vs bf16 + channels_last at the recipe's batch (24), 64 and 256
# 2. Ray Train end to end from a cache, at batch 64 and 24: albumentations on the data workers vs the batched
#    torch augmentation on the GPU (feed_ratio, img/s per worker, first batch per epoch)
# 3. last (so a time limit still leaves 1 and 2): torch.compile of the training step at batch 64 beside the same
#    step uncompiled, with its compilation time (first_step_s); it took over 120 s to compile on an H200 before
# TINY=1 shrinks everything to a CPU smoke run of the same commands (COMPILE=0 leaves out 3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -f .gpu/site.tar.xz ] && [ "$PY" = python3 ]; then
  mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
fi
export NO_ALBUMENTATIONS_UPDATE=1
if [ "${TINY:-0}" = 1 ]; then
  STEP="--batch-sizes 4 --steps 2 --warmup 1 --image-size 96"
  E2E="--studies 12 --image-size 96 --epochs 2"
  BATCHES="8"
  COMPILE_STEP="--batch-sizes 4 --steps 2 --warmup 1 --image-size 96"
else
  STEP="--batch-sizes 24,64,256 --steps 30 --warmup 10"
  E2E="--studies 120 --image-size 256 --epochs 3"
  BATCHES="64 24"
  COMPILE_STEP="--batch-sizes 64 --steps 30 --warmup 3"
fi
$PY benchmarks/train_throughput.py $STEP --out "$OUT/step.json"
for batch in $BATCHES; do
  for on in data device; do
    $PY benchmarks/train_e2e.py $E2E --batch-size "$batch" --augment-on "$on" --cpus-per-worker 1 \
      --out "$OUT/e2e-b$batch-$on.json"
  done
done
if [ "${COMPILE:-1}" = 1 ]; then
  $PY benchmarks/train_throughput.py $COMPILE_STEP --compile --out "$OUT/step-compile.json"
fi
cat "$OUT"/*.json
