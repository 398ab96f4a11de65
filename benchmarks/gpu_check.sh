#!/usr/bin/env bash
# The GPU measurement as one script, for the device machine (torch there, Ray etc. from ../shared/tools/gpu-bundle.sh):
#
#   here:    make .venv && bash ../shared/tools/gpu-bundle.sh && TINY=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh
#   device:  bash benchmarks/gpu_check.sh          (writes every JSON file and the log under $OUT, default ./gpu-out)
#
# One phantom and one cache are written first and shared by every measurement. Then, most wanted first, so that a
# time limit cuts only the tail:
# 1. (STEP_ALONE=1; measured on 2026-11-29, off by default) the training step alone: fp32 vs bf16 + channels_last
#    at the recipe's batch (24), 64 and 256
# 2. Ray Train end to end from the cache (every training image each epoch, not the balanced subset, so that an
#    epoch lasts long enough to time), for each of BATCHES (default "64 256"), AUGMENT_ON (default "device": the
#    recipe's augmentation batched in torch on the GPU; "data": albumentations on the data workers) and PINS
#    (default "0 1": batches in pageable, then page-locked memory; train.pin_memory) (feed_ratio, img/s per
#    worker, first batch per epoch)
# 3. the input pipeline on all cores: Ray Data vs a DataLoader, the cache epoch vs the DICOM epoch
# 4. torch.compile of the training step at batch 64 beside the same step uncompiled, with its compilation time
#    (first_step_s); it took over 120 s to compile on an H200 before
# TINY=1 shrinks everything to a CPU smoke run of the same commands. PIPELINE=0 and COMPILE=0 leave out 3 and 4.
# Seconds each part took on one H200 with 16 cores (2026-11-29), for a device session's 15 minutes: unpacking ~10,
# phantom 21, cache 34, 1. 178 (cuDNN picks its kernels in each first step: 10-26 s), 2. 75-87 per run, 3. over 100,
# 4. over 120.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -f .gpu/site.tar.xz ] && [ "$PY" = python3 ]; then
  mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site
  chmod -R +x /tmp/site/ray/core  # the bundle is unpacked with zipfile, which drops the mode of gcs_server, raylet ...
  export PYTHONPATH=/tmp/site:$PWD
fi
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ "${TINY:-0}" = 1 ]; then
  STUDIES=8; SIZE=96; EPOCHS=2; BATCHES=${BATCHES:-8}; PINS=${PINS:-1}
  STEP="--batch-sizes 4 --steps 2 --warmup 1"
  COMPILE_STEP="--batch-sizes 4 --steps 2 --warmup 1"
else
  STUDIES=160; SIZE=256; EPOCHS=3; BATCHES=${BATCHES:-64 256}; PINS=${PINS:-0 1}
  STEP="--batch-sizes 24,64,256 --steps 30 --warmup 10"
  COMPILE_STEP="--batch-sizes 64 --steps 30 --warmup 3"
fi
stamp() { echo "[gpu_check $(date +%T)] $*" >&2; }
{
  stamp "machine: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo no GPU)"
  stamp "phantom: $STUDIES studies of 512 px"
  $PY -m raysys.cli synth "$WORK/phantom" --studies "$STUDIES" --size 512 >&2
  stamp "cache at $SIZE px"
  $PY -m raysys.cli prepare --data "$WORK/phantom/dicoms" --labels "$WORK/phantom/labels.csv" --image-size "$SIZE" \
    --out "$WORK/cache" >&2
  if [ "${STEP_ALONE:-0}" = 1 ]; then
    stamp "1. the step alone"
    $PY benchmarks/train_throughput.py $STEP --image-size "$SIZE" --out "$OUT/step.json"
  fi
  for on in ${AUGMENT_ON:-device}; do
    for batch in $BATCHES; do
      for pin in $PINS; do
        stamp "2. Ray Train end to end: batch $batch, augmentation on the $on, pin_memory $pin"
        $PY benchmarks/train_e2e.py --data "$WORK/cache" --labels "$WORK/cache/labels.csv" --image-size "$SIZE" \
          --epochs "$EPOCHS" --neg-ratio 1000 --batch-size "$batch" --augment-on "$on" --cpus-per-worker 1 \
          $([ "$pin" = 1 ] && echo --pin-memory) --out "$OUT/e2e-b$batch-$on-pin$pin.json"
      done
    done
  done
  if [ "${PIPELINE:-1}" = 1 ]; then
    stamp "3. the input pipeline on $(nproc) cores"
    $PY benchmarks/data_pipeline.py --data "$WORK/phantom/dicoms" --labels "$WORK/phantom/labels.csv" --size "$SIZE" \
      --dataloader-workers "$(( $(nproc) > 2 ? $(nproc) - 1 : 2 ))" --out "$OUT/pipeline.json"
  fi
  if [ "${COMPILE:-1}" = 1 ]; then
    stamp "4. torch.compile of the step"
    $PY benchmarks/train_throughput.py $COMPILE_STEP --image-size "$SIZE" --compile --out "$OUT/step-compile.json"
  fi
  stamp done
} 2>&1 | tee "$OUT/log"
