"""What raysys' fix to Ray Data's start-up is worth: epochs with it and without it, alternating in one run.

Ray Data executions start with resource limits of zero until the AutoscalingCoordinator's reservation has been
read, which Ray does at most once a second, so each execution's first second runs one task at a time
(raysys.runtime._limits_from_the_first_reservation). This script times the same epochs (the DICOM epoch and the
cache epoch of data_pipeline.py: image_dataset without augmentation -> iter_torch_batches(32), iterated here in
the driver, where the executor runs) with Ray's own get_global_limits and with raysys' wrapper, in turns, and
reports each mode's median epoch, time to the first batch, and when the limits first held a CPU.

    .venv/bin/python benchmarks/execution_start.py [--data DIR] [--studies 110] [--rounds 3] [--size 256]
        [--num-cpus N | --address ADDR] [--out result.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import add_ray_flags, emit, init_ray, input_data, log, machine

from raysys import data as rdata
from raysys.config import DataConfig

WINDOWS = DataConfig().windows


def epoch(make_ds, batch_size: int) -> dict:
    """One epoch in this process: seconds to the first batch and to the last, and when the limits held a CPU."""
    from ray.data._internal.execution.resource_manager import ResourceManager

    current, seen = ResourceManager.get_global_limits, []

    def watched(self):
        limits = current(self)
        if not seen and limits.cpu > 0:
            seen.append(time.perf_counter())
        return limits

    ResourceManager.get_global_limits = watched
    try:
        start, first, n = time.perf_counter(), None, 0
        ds = make_ds().select_columns(["image"], num_cpus=0.25)
        for batch in ds.iter_torch_batches(batch_size=batch_size, dtypes={"image": torch.uint8}):
            first = first or time.perf_counter()
            n += len(batch["image"])
        end = time.perf_counter()
    finally:
        ResourceManager.get_global_limits = current
    return {"epoch_s": end - start, "first_batch_s": first - start, "images": n,
            "limits_after_s": seen[0] - start if seen else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of .dcm files (default: a generated phantom)")
    parser.add_argument("--studies", type=int, default=110, help="phantom studies without --data (~18 slices each)")
    parser.add_argument("--rounds", type=int, default=3, help="epochs per mode and source, in turns")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    add_ray_flags(parser)
    args = parser.parse_args()

    import ray
    from ray.data._internal.execution.resource_manager import ResourceManager

    with tempfile.TemporaryDirectory(prefix="raysys-bench-") as tmp:
        data, _ = input_data(args.data, args.studies, Path(tmp))
        cores = init_ray(args.address, args.num_cpus)
        fixed = ResourceManager.get_global_limits  # init_ray installed the fix
        if not getattr(fixed, "raysys_fix", False):
            raise SystemExit("this Ray has no get_global_limits for raysys to fix: nothing to compare")
        modes = {"ray": fixed.__wrapped__, "raysys": fixed}
        try:
            found = rdata.scan(str(data), None, training=False, max_error_fraction=1.0)
            cache = Path(tmp) / "cache"
            rdata.prepare(DataConfig(data=str(data), labels="", windows=WINDOWS, image_size=args.size,
                                     max_error_fraction=1.0), str(cache))
            cached = rdata.scan(str(cache), None, training=False, max_error_fraction=1.0)
            sources = {
                "dicom": lambda: rdata.image_dataset(found.index, found, windows=WINDOWS, size=args.size,
                                                     with_labels=False),
                "cache": lambda: rdata.image_dataset(cached.index.loc[found.index.index], cached, windows=WINDOWS,
                                                     size=args.size, with_labels=False),
            }
            for make_ds in sources.values():  # worker processes started and imported before anything is timed
                epoch(make_ds, args.batch_size)
            runs = {(mode, source): [] for mode in modes for source in sources}
            for r in range(args.rounds):
                for mode, get_global_limits in modes.items():
                    ResourceManager.get_global_limits = get_global_limits
                    for source, make_ds in sources.items():
                        run = epoch(make_ds, args.batch_size)
                        if run["images"] != len(found.index):
                            raise RuntimeError(f"{source}: {run['images']} images of {len(found.index)}")
                        runs[mode, source].append(run)
                        log(f"round {r + 1} {mode:6s} {source}: epoch {run['epoch_s']:.3f} s, first batch "
                            f"{run['first_batch_s']:.3f} s, limits after {run['limits_after_s']}")
        finally:
            ResourceManager.get_global_limits = fixed
            ray.shutdown()

    def median(mode: str, source: str, key: str) -> float | None:
        values = [run[key] for run in runs[mode, source] if run[key] is not None]
        return round(statistics.median(values), 3) if values else None

    result = {"benchmark": "execution_start", "images": len(found.index), "size": args.size, "rounds": args.rounds,
              "cores": cores, "data": str(args.data) if args.data else f"phantom(studies={args.studies}, size=512)"}
    for source in sources:
        for mode in modes:
            for key in ("epoch_s", "first_batch_s", "limits_after_s"):
                result[f"{source}_{key}_{mode}"] = median(mode, source, key)
        result[f"{source}_speedup"] = round(median("ray", source, "epoch_s") / median("raysys", source, "epoch_s"), 2)
    for mode in modes:
        result[f"cache_vs_dicom_{mode}"] = round(median(mode, "dicom", "epoch_s") / median(mode, "cache", "epoch_s"), 2)
    emit({**result, **machine()}, args.out)


if __name__ == "__main__":
    main()
