"""Images/s of the whole Ray Train run (Ray Data feeding the workers) against the training step alone.

In one run, on one machine:

  e2e         raysys.train.fit on a prepared cache (default) or the DICOMs themselves, with the recipe's
              augmentation (on the data workers, or --augment-on device), --epochs epochs; per epoch: each
              worker's images/s over the whole epoch loop, the wait for its first batch, the epoch's seconds
  standalone  raysys.engine.train_one_epoch in this process on the same device, model, batch size, precision
              and augmentation placement, fed from batches already in memory: the rate the step allows
  feed_ratio  mean e2e img/s/worker of epochs >= 2 over the standalone rate (1.0 = the data keeps up)
  --compile   both sides torch.compile the step (raysys train --compile); each epoch's first_step_s
              then holds the compilation in epoch 1

Without --data a phantom (--studies, 512 px) is written and, unless --no-cache, prepared into a cache first
(prepare_s). GPUs are used when present: one per worker. Prints one JSON line to stdout, progress to stderr.

    .venv/bin/python benchmarks/train_e2e.py [--data DIR --labels CSV] [--studies 20] [--image-size 256]
        [--batch-size 64] [--epochs 3] [--workers 1] [--augment-on data|device] [--neg-ratio 1.0] [--compile MODE] [--no-cache]
        [--num-cpus N | --address ADDR] [--out result.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
from _common import add_ray_flags, emit, init_ray, input_data, log, machine

STANDALONE_STEPS = 20  # timed steps of the standalone rate (after WARMUP_STEPS)
WARMUP_STEPS = 3


def standalone_rate(cfg, device_name: str, threads: int) -> float:
    """train_one_epoch's images/s on in-memory batches: the same step the workers run, with nothing to wait for,
    on as many torch threads as a worker ran (Ray sets a worker's OMP_NUM_THREADS from its CPUs: 1 for 0.5)."""
    import torch

    torch.set_num_threads(threads)

    from raysys.device_augment import DeviceAugment
    from raysys.engine import WeightedBCE, compile_step, train_one_epoch, use_amp
    from raysys.labels import LABELS
    from raysys.model import build_model

    device = torch.device(device_name)
    t, size = cfg.train, cfg.data.image_size
    model = build_model(image_size=size).to(device, memory_format=torch.channels_last)  # as raysys.train
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
    step_model = compile_step(model, t.compile)  # compiles in the warm-up
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (t.batch_size, 3, size, size), dtype=torch.uint8, generator=g).to(device),
             "label": (torch.rand(t.batch_size, len(LABELS), generator=g) < 0.3).float().to(device),
             "aug_seed": torch.arange(t.batch_size)}
    augment = DeviceAugment(cfg.augment, size, device) if cfg.augment.on == "device" else None
    kwargs = {"amp": use_amp(t.amp, device, t.batch_size), "augment": augment}
    train_one_epoch(step_model, [batch] * WARMUP_STEPS, optimizer, WeightedBCE().to(device), device, **kwargs)
    stats = train_one_epoch(step_model, [batch] * STANDALONE_STEPS, optimizer, WeightedBCE().to(device), device,
                            **kwargs)
    return stats["train_images_per_s"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of .dcm files or a prepared cache (default: a phantom)")
    parser.add_argument("--labels", type=Path, help="labels CSV for --data")
    parser.add_argument("--studies", type=int, default=20, help="phantom studies when --data is not given")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--augment-on", choices=["data", "device"], default="data")
    parser.add_argument("--neg-ratio", type=float, default=1.0, help="negatives per positive each epoch (the "
                        "recipe's 1.0 trains on a balanced subset; a large value trains on every image)")
    parser.add_argument("--amp", default="auto", help="training step precision: auto, bf16 or off")
    parser.add_argument("--compile", default="off", help="torch.compile the step (both sides): off, default, "
                        "reduce-overhead (CUDA graphs), max-autotune or aot_eager")
    parser.add_argument("--no-cache", action="store_true", help="train from the DICOMs, not a prepared cache")
    parser.add_argument("--pin-memory", action="store_true", help="batches in page-locked memory (CUDA only)")
    add_ray_flags(parser)
    args = parser.parse_args(argv)

    import ray
    import torch

    from raysys.config import Config
    from raysys.data import is_cache, prepare
    from raysys.train import fit

    gpus = torch.cuda.device_count()
    device_name = "cuda" if gpus else "cpu"
    with tempfile.TemporaryDirectory(prefix="raysys-bench-") as tmp:
        tmp = Path(tmp)
        data, labels = (args.data, args.labels) if args.data and is_cache(str(args.data)) else \
            input_data(args.data, args.studies, tmp)
        labels = labels or args.labels
        cores = init_ray(args.address, args.num_cpus, dashboard=True)
        cfg = Config().replace(**{
            "data.data": str(data), "data.labels": str(labels), "data.image_size": args.image_size,
            "model.weights": "none", "augment.on": args.augment_on,
            "data.neg_ratio": args.neg_ratio,
            "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.workers": args.workers,
            "train.cpus_per_worker": args.cpus_per_worker, "train.gpus_per_worker": 1.0 if gpus else 0.0,
            "train.amp": args.amp, "train.compile": args.compile, "train.pin_memory": args.pin_memory,
            "train.storage_path": str(tmp / "runs"), "train.name": "e2e",
        })
        prepare_s = None
        if not args.no_cache and not is_cache(str(data)):
            start = time.perf_counter()
            prepare(cfg.data, str(tmp / "cache"))
            prepare_s = round(time.perf_counter() - start, 1)
            cfg = cfg.replace(**{"data.data": str(tmp / "cache"), "data.labels": str(tmp / "cache" / "labels.csv")})
            log(f"prepared the cache in {prepare_s}s")
        log(f"training {args.epochs} epochs, batch {args.batch_size}, {args.workers} worker(s) on {device_name}")
        result = fit(cfg)
        history = pd.read_csv(Path(result.run_dir) / "metrics.csv")
        ray.shutdown()  # the standalone rate gets the whole machine, as the worker had it
        threads = int(history["torch_threads"].iloc[-1])
        standalone = standalone_rate(cfg, device_name, threads)

    later = history[history["epoch"] >= 2]
    e2e = float(later["train_images_per_s"].mean()) if len(later) else None
    out = {
        "device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus, "cluster_cpus": cores,
        "source": "dicom" if args.no_cache else "cache", "prepare_s": prepare_s, "neg_ratio": args.neg_ratio,
        "augment_on": args.augment_on,
        "amp": args.amp, "compile": args.compile, "pin_memory": args.pin_memory,
        "image_size": args.image_size, "batch_size": args.batch_size,
        "workers": args.workers, "torch_threads": threads,  # a worker's, and the standalone step's
        "images_per_epoch": int(history["train_images"].iloc[-1]),
        "epochs": [{"epoch": int(r.epoch), "images_per_s_per_worker": round(r.train_images_per_s, 1),
                    "first_batch_s": round(r.first_batch_seconds, 2), "first_step_s": round(r.first_step_seconds, 2),
                    "epoch_s": round(r.epoch_seconds, 1)}
                   for r in history.itertuples()],
        "e2e_images_per_s_per_worker": round(e2e, 1) if e2e else None,
        "standalone_images_per_s": round(standalone, 1),
        "feed_ratio": round(e2e / standalone, 3) if e2e else None,
    }
    out.update(machine())
    emit(out, args.out)
    return out


if __name__ == "__main__":
    main()
