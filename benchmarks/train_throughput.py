"""Training and inference images/s of the raysys InceptionV3 on one GPU (or CPU): fp32 NCHW vs channels_last, bf16.

Plain torch, no Ray (it runs where Ray is not installed): raysys.model.build_model() with
Adam (lr 5e-4, the recipe's) and raysys.engine.WeightedBCE, on synthetic uint8 images
(B, 3, S, S) already on the device, normalised by raysys.presets.to_model_input as training does.
For each batch size (--batch-sizes) and mode, a fresh model runs --warmup steps, then --steps
timed steps between two cuda synchronizes:

  fp32       float32, NCHW (cuDNN may still use TF32 for convolutions: torch's default, reported)
  fp32_cl    float32 + channels_last model and inputs, as raysys.engine does on a CPU
  bf16_cl    torch.autocast(bfloat16) + channels_last model and inputs, as raysys.engine does on CUDA
  compile    torch.compile(model, mode=--compile-mode) at the precision raysys trains in on the device (bf16_cl
             on CUDA, fp32_cl on a CPU), only with --compile: what `raysys train --compile MODE` runs

Then the same model in eval mode times --steps inference passes of the batch under
torch.inference_mode (inference_images_per_s: what batch predict and Serve run).
The first step and the first inference pass of each mode are timed on their own (first_step_s,
first_inference_s): for compile that is the compilation (training and inference graphs are
compiled separately), for the others cuDNN's autotuning and allocations.
Unlike train_one_epoch, a step does not read loss.item(): this is the GPU's throughput, without
the per-step host sync. A batch size that runs out of memory is reported as such. Without CUDA it
runs on the CPU (bf16 is fast there only with bf16 units; a note says so): for a smoke test use tiny flags.

    .venv/bin/python benchmarks/train_throughput.py [--batch-sizes 24,64,128] [--steps 20]
        [--warmup 5] [--image-size 256] [--compile [--compile-mode reduce-overhead]] [--out FILE]
    .venv/bin/python benchmarks/train_throughput.py --batch-sizes 4 --steps 2 --warmup 1 --image-size 96
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import emit, log, machine

from raysys.engine import WeightedBCE, autocast, compile_step, use_amp
from raysys.labels import LABELS
from raysys.model import build_model
from raysys.presets import to_model_input

LR = 5e-4  # TrainConfig.lr, the reference recipe's Adam learning rate


def images_per_s(mode: str, batch_size: int, args, device: torch.device) -> tuple[float, float, float, float]:
    """Build a fresh model for `mode`, time its first step, warm up, then time args.steps training steps; the same
    for inference passes. (training, inference) images per second, then (first step, first inference) seconds."""
    torch.manual_seed(0)
    # compile: raysys' own training precision at this batch (its inference passes too, for a like-for-like pair)
    amp = mode == "bf16_cl" or (mode == "compile" and use_amp("auto", device, batch_size))
    fmt = torch.contiguous_format if mode == "fp32" else torch.channels_last
    model = build_model(image_size=args.image_size).to(device, memory_format=fmt).train()
    forward = compile_step(model, args.compile_mode) if mode == "compile" else model
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = WeightedBCE().to(device)
    images = torch.randint(0, 256, (batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch_size, len(LABELS)), device=device).float()

    def step() -> None:
        x = to_model_input(images, model.contract.mean, model.contract.std).contiguous(memory_format=fmt)
        with autocast(device, amp):
            logits = forward(x)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        x = to_model_input(images, model.contract.mean, model.contract.std).contiguous(memory_format=fmt)
        with torch.inference_mode(), autocast(device, amp):
            forward(x)

    rates, firsts = [], []
    for fn in (step, infer):
        model.train(fn is step)
        start = time.perf_counter()
        fn()  # the first of the warm-up steps
        synchronize(device)
        firsts.append(time.perf_counter() - start)
        for _ in range(args.warmup - 1):
            fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        synchronize(device)
        rates.append(batch_size * args.steps / (time.perf_counter() - start))
    return rates[0], rates[1], firsts[0], firsts[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="24,64,128", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per (mode, batch size)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, >= 1 (cuDNN autotune, compilation)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (mode compile)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile's mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step is timed on its own)")

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
        log("no CUDA device: running on the CPU; bf16 autocast is fast on CPUs with bf16 units (AMX, AVX-512 BF16) only")
    modes = ["fp32", "fp32_cl", "bf16_cl"] + (["compile"] if args.compile else [])
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    results = []
    for batch_size in batch_sizes:
        for mode in modes:
            entry = {"mode": mode, "batch_size": batch_size}
            try:
                train, inference, first_step, first_inference = images_per_s(mode, batch_size, args, device)
                entry["images_per_s"], entry["inference_images_per_s"] = round(train, 2), round(inference, 2)
                entry["first_step_s"], entry["first_inference_s"] = round(first_step, 3), round(first_inference, 3)
            except torch.cuda.OutOfMemoryError:
                entry["images_per_s"], entry["inference_images_per_s"], entry["error"] = None, None, "out of memory"
            if device.type == "cuda":
                entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                torch.cuda.reset_peak_memory_stats(device)
                torch.cuda.empty_cache()
            log(f"{mode:8s} batch {batch_size:4d}  training {entry['images_per_s']} img/s  "
                f"inference {entry['inference_images_per_s']} img/s  first step {entry.get('first_step_s')} s")
            results.append(entry)

    rate = {(r["mode"], r["batch_size"]): r["images_per_s"] for r in results}
    served = {(r["mode"], r["batch_size"]): r["inference_images_per_s"] for r in results}
    result = {"device": name, "device_type": device.type, "cuda": torch.version.cuda,
              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
              "matmul_precision": torch.get_float32_matmul_precision(),
              "image_size": args.image_size, "steps": args.steps, "warmup": args.warmup, "lr": LR,
              "compile_mode": args.compile_mode if args.compile else None,
              "results": results}
    for bs in batch_sizes:
        for mode, key in (("fp32_cl", "channels_last_speedup"), ("bf16_cl", "bf16_speedup"),
                          ("compile", "compile_speedup")):
            if mode in modes and rate[("fp32", bs)] and rate[(mode, bs)]:
                result[f"{key}_at_{bs}"] = round(rate[(mode, bs)] / rate[("fp32", bs)], 2)
                result[f"inference_{key}_at_{bs}"] = round(served[(mode, bs)] / served[("fp32", bs)], 2)
        eager = "bf16_cl" if use_amp("auto", device, bs) else "fp32_cl"  # the compiled step's precision, uncompiled
        if "compile" in modes and rate[(eager, bs)] and rate[("compile", bs)]:
            result[f"compile_vs_eager_at_{bs}"] = round(rate[("compile", bs)] / rate[(eager, bs)], 2)
            result[f"inference_compile_vs_eager_at_{bs}"] = round(served[("compile", bs)] / served[(eager, bs)], 2)
    if device.type == "cpu":
        result["note"] = "no CUDA device: measured on the CPU, where bf16 autocast is fast only with bf16 units"
    result.update(machine())
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
