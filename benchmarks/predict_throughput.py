"""Images/s of batch inference with raysys.predict.predict on Ray vs a plain single-process loop.

Both paths go from a checkpoint folder and a folder of DICOMs to per-image probabilities, on the
same files in the same run, each warmed up first (a predict_folder() call on a few copied files; one
batch through the loop):

  raysys_predict  raysys.predict.predict_folder(checkpoint, data, InferenceConfig): scan, then Ray Data
                  decode tasks feeding `actors` Predictor actors (1 CPU each, so 1 torch thread each).
                  Timed over the whole call (scan, actor start and model load included); the
                  inference stage alone is reported too (predict's own Predictions.seconds).
  single_process  load_checkpoint, then per file raysys.presets.dicom_to_image and
                  raysys.predict.infer in batches of the same size, in this process (torch's
                  default thread count: all cores). Timed from loading the checkpoint.

Each predict_folder() call starts its actors afresh (a new process imports torch and loads the model:
seconds), so on few files that fixed cost dominates raysys_predict_ips; raysys_marginal_ips
estimates the rate beyond it from a second timed call on the warm-up's batch_size files:
(images - those images) / (difference in seconds).

The two should agree: max_abs_diff is the largest probability difference over all images
(matched by image id; above 1e-4 a warning goes to stderr). Without --checkpoint an untrained
InceptionV3 is saved at --image-size (speed does not depend on the weights); without --data a
small 512 x 512 phantom is written. InceptionV3 at 256 px evaluates at ~30 img/s on a 2-core
CPU: keep the file count small on CPUs or use --image-size 128. By default Ray runs locally on
all cores with cores - 1 actors (one CPU
is left to the decode tasks, which could not be scheduled otherwise).

    .venv/bin/python benchmarks/predict_throughput.py [--data DIR] [--studies 4] [--checkpoint DIR]
        [--image-size 256] [--batch-size 32] [--actors N] [--num-cpus N | --address ADDR] [--out FILE]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import add_ray_flags, emit, init_ray, input_data, log, machine, untrained_checkpoint

from raysys.config import InferenceConfig
from raysys.dicom import DicomDecodeError
from raysys.engine import infer
from raysys.labels import LABELS
from raysys.model import load_checkpoint, read_meta
from raysys.predict import predict_folder
from raysys.presets import dicom_to_image


def single_process(checkpoint: Path, paths: list[Path], batch_size: int) -> pd.DataFrame:
    """The plain loop: decode each file, run full batches through the model; image_id + LABELS rows."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(checkpoint, device)
    windows, size = loaded.meta["windows"], loaded.meta["image_size"]
    ids, images, probs = [], [], []
    for path in paths:
        try:
            image, meta = dicom_to_image(path, windows, size)  # (C, S, S) uint8
        except DicomDecodeError:
            continue  # predict_folder() skips unreadable files too
        ids.append(meta.image_id or path.stem)
        images.append(image)
        if len(images) == batch_size:
            probs.append(infer(loaded.model, np.stack(images), device))
            images.clear()
    if images:
        probs.append(infer(loaded.model, np.stack(images), device))
    frame = pd.DataFrame(np.concatenate(probs), columns=list(LABELS))
    frame.insert(0, "image_id", ids)
    return frame


def timed(fn, name: str):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    log(f"{name:15s} {seconds:7.2f} s")
    return out, seconds


def max_abs_diff(a: pd.DataFrame, b: pd.DataFrame) -> float:
    a, b = a.set_index("image_id").sort_index(), b.set_index("image_id").sort_index()
    if not a.index.equals(b.index):
        raise RuntimeError(f"the two paths scored different images: {len(a)} vs {len(b)} "
                           f"(e.g. {list(a.index.symmetric_difference(b.index)[:3])})")
    return float(np.abs(a[list(LABELS)].to_numpy() - b[list(LABELS)].to_numpy()).max())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of .dcm files (default: a generated phantom)")
    parser.add_argument("--studies", type=int, default=4, help="phantom studies without --data (~18 slices each)")
    parser.add_argument("--checkpoint", type=Path, help="raysys checkpoint (default: an untrained one at --image-size)")
    parser.add_argument("--image-size", type=int, default=256, help="size of the generated checkpoint")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, help="Predictor actors (default: cores - 1, at least 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    add_ray_flags(parser)
    args = parser.parse_args(argv)

    import ray

    with tempfile.TemporaryDirectory(prefix="raysys-bench-") as tmp:
        tmp = Path(tmp)
        data, _ = input_data(args.data, args.studies, tmp)
        checkpoint = args.checkpoint or untrained_checkpoint(tmp / "checkpoint", args.image_size)
        image_size = read_meta(checkpoint)["image_size"]
        paths = sorted(data.rglob("*.dcm"))
        warm = tmp / "warmup"
        warm.mkdir()
        for path in paths[: args.batch_size]:
            shutil.copy(path, warm / path.name)

        cores = init_ray(args.address, args.num_cpus)
        actors = args.actors or max(1, cores - 1)
        log(f"{len(paths)} files, image size {image_size}, batch {args.batch_size}, {actors} actors on {cores} CPUs")
        cfg = InferenceConfig(batch_size=args.batch_size, actors=actors, gpus_per_actor=args.gpus_per_actor)
        try:
            predict_folder(str(checkpoint), str(warm), cfg, progress=False)  # warm-up: Ray worker processes, imports
            warm_out, warm_s = timed(lambda: predict_folder(str(checkpoint), str(warm), cfg, progress=False),
                                     "predict (few)")
            ray_out, ray_s = timed(lambda: predict_folder(str(checkpoint), str(data), cfg, progress=False),
                                   "raysys_predict")
        finally:
            ray.shutdown()

        single_process(checkpoint, paths[: args.batch_size], args.batch_size)  # warm-up
        threads = torch.get_num_threads()
        base, base_s = timed(lambda: single_process(checkpoint, paths, args.batch_size), "single_process")

    images, n_warm = len(ray_out.frame), len(warm_out.frame)
    diff = max_abs_diff(ray_out.frame, base)
    log(f"{images} images; max |raysys - single process| = {diff:.2e}")
    if diff > 1e-4:
        log(f"WARNING: the two paths disagree by {diff:.2e}: they should give the same probabilities")
    grown = images > n_warm and ray_s > warm_s
    marginal = round((images - n_warm) / (ray_s - warm_s), 2) if grown else None  # rate beyond the fixed cost
    result = {
        "raysys_predict_ips": round(images / ray_s, 2),
        "single_process_ips": round(len(base) / base_s, 2),
        "speedup": round((images / ray_s) / (len(base) / base_s), 2),
        "raysys_predict_s": round(ray_s, 3),
        "raysys_inference_stage_s": round(ray_out.seconds, 3),
        "raysys_inference_stage_ips": round(images / ray_out.seconds, 2),
        "raysys_marginal_ips": marginal,
        "single_process_s": round(base_s, 3),
        "single_process_threads": threads,
        "images": images,
        "excluded_files": len(ray_out.errors),
        "image_size": image_size,
        "batch_size": args.batch_size,
        "actors": actors,
        "gpus_per_actor": args.gpus_per_actor,
        "cores": cores,
        "max_abs_diff": diff,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "checkpoint": str(args.checkpoint) if args.checkpoint else f"untrained InceptionV3 at {image_size} px",
        "data": str(args.data) if args.data else f"phantom(studies={args.studies}, size=512, seed=0)",
        **machine(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
