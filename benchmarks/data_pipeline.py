"""Images/s of the Ray Data training input pipeline vs one core x cores and a torch DataLoader; cache vs DICOM.

On the same files, in the same run, each path warmed up on a small pass first:

  ray_data      raysys.data.image_dataset (DICOM -> windows, 256 px) -> augment_dataset(AugmentConfig(),
                seed=0, epoch=1) -> select_columns(image, label) -> iter_torch_batches(32): one epoch,
                timed from building the dataset to the last batch (scan() is not timed); ray_data_warm
                is the same epoch again, once Ray's worker processes have started and imported
  per_core      one process, one cv2 thread: raysys.presets.dicom_to_image per file, file read included
                (per_core_ips; x cores = per_core_x_cores_ips, the ideal for decoding alone), and the same
                plus augmentation (per_core_augmented_ips, the ideal per core for what ray_data does)
  dataloader    torch DataLoader(num_workers=2, batch_size=32) over a Dataset whose __getitem__ reads the
                file, decodes it with dicom_to_image and augments it with build_augment(AugmentConfig())
                seeded per image exactly as Ray Data is (raysys.augment.image_seed)
  cache         raysys.data.prepare(...) once (prepare_s), then one epoch of image_dataset without
                augmentation from the cache (zstd Parquet shards, read shard by shard) vs from the DICOMs,
                same images in the same order (cache_speedup)
  floor         the same epoch from read tasks that read nothing: one per cache shard, each returning its
                shard's rows as zero images of the same shape. What is left is Ray Data's own cost of an
                epoch (tasks, object store, batches), so dicom_epoch_s / floor_epoch_s is the most any
                cache could gain here (cache_speedup_ceiling)

Without --data a phantom dataset of 512 x 512 slices is written to a temporary folder (labels
included). Ray runs locally on --num-cpus (default: all cores) unless --address is given.
Prints one JSON line to stdout; progress goes to stderr.

    .venv/bin/python benchmarks/data_pipeline.py [--data DIR [--labels CSV]] [--studies 20]
        [--size 256] [--batch-size 32] [--num-cpus N | --address ADDR] [--out result.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from _common import add_ray_flags, emit, init_ray, input_data, log, machine

from raysys import data as rdata
from raysys.augment import build_augment, image_seed
from raysys.config import AugmentConfig, DataConfig
from raysys.labels import LABELS
from raysys.presets import dicom_to_image
from raysys.windowing import parse_windows

WINDOWS = DataConfig().windows  # image_dataset's default windows: every path uses the same ones
WARMUP_IMAGES = 32  # one small pass per path before timing: worker processes, imports, kernels


class DecodeAugment(torch.utils.data.Dataset):
    """The DataLoader baseline: read + decode + window + augment one file per item, as Ray Data's tasks do."""

    def __init__(self, index, size: int, labels: bool, seed: int = 0, epoch: int = 1):
        self.paths, self.ids = list(index["path"]), list(index["image_id"])
        self.labels = index[list(LABELS)].to_numpy(np.float32) if labels else None
        self.size, self.seed, self.epoch = size, seed, epoch
        self.augment = None  # built on first use in each worker process

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        if self.augment is None:
            self.augment = build_augment(AugmentConfig())
        image, _ = dicom_to_image(self.paths[i], WINDOWS, self.size)  # (C, S, S) uint8
        self.augment.set_random_seed(image_seed(self.seed, self.epoch, self.ids[i]))
        image = self.augment(image=image.transpose(1, 2, 0))["image"].transpose(2, 0, 1)
        item = {"image": torch.from_numpy(np.ascontiguousarray(image))}
        if self.labels is not None:
            item["label"] = torch.from_numpy(self.labels[i])
        return item


def _zero_rows(rows: int, shape: tuple[int, ...], labels: bool) -> list:
    import pyarrow as pa

    out = {"image": pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((rows, *shape), np.uint8))}
    if labels:
        out["label"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((rows, len(LABELS)), np.float32))
    return [pa.table(out)]


def floor_dataset(shard_rows: list[int], shape: tuple[int, ...], labels: bool, cpus: float):
    """An epoch's images as zeros from read tasks that read nothing, one task per cache shard with its rows."""
    import functools

    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    size = int(np.prod(shape))

    class Zeros(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(shard_rows) * size

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [ReadTask(functools.partial(_zero_rows, rows, shape, labels),
                             BlockMetadata(num_rows=rows, size_bytes=rows * size, exec_stats=None, input_files=None),
                             per_task_row_limit=per_task_row_limit) for rows in shard_rows]

    return ray.data.read_datasource(Zeros(), num_cpus=cpus, override_num_blocks=len(shard_rows))


def consume(ds, columns: list[str], batch_size: int) -> int:
    """Pull every row through iter_torch_batches, as a training loop would; returns the image count."""
    dtypes = {"image": torch.uint8, "label": torch.float32}
    ds = ds.select_columns(columns, num_cpus=0.25)
    batches = ds.iter_torch_batches(batch_size=batch_size, dtypes={c: dtypes[c] for c in columns})
    return sum(len(b["image"]) for b in batches)


def timed_epoch(make_ds, index, columns: list[str], batch_size: int, name: str) -> float:
    """Warm up on the first images, then time one full epoch (dataset construction included); seconds."""
    consume(make_ds(index.head(WARMUP_IMAGES)), columns, batch_size)
    start = time.perf_counter()
    n = consume(make_ds(index), columns, batch_size)
    seconds = time.perf_counter() - start
    if n != len(index):
        raise RuntimeError(f"{name}: {n} images came out of {len(index)}")
    log(f"{name:14s} {n} images  {seconds:6.2f} s  {n / seconds:8.1f} img/s")
    return seconds


def per_core_rate(fn, n: int, min_seconds: float, name: str) -> float:
    """Images/s of fn(i) for i in range(n), whole passes for >= min_seconds, in this process on one cv2 thread."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        fn(0)  # warm-up
        done, start = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - start < min_seconds:
            for i in range(n):
                fn(i)
            done += n
        rate = done / (time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)
    log(f"{name:14s} {done} images  {rate:8.1f} img/s")
    return rate


def dataloader_rate(dataset: DecodeAugment, batch_size: int, workers: int) -> float:
    dataset[0]  # warm-up in the parent (imports, augmentation pipeline); forked workers inherit it
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    n = sum(len(b["image"]) for b in loader)
    rate = n / (time.perf_counter() - start)
    log(f"{'dataloader':14s} {n} images  {rate:8.1f} img/s  ({workers} workers)")
    return rate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="folder of .dcm files (default: a generated phantom)")
    parser.add_argument("--labels", type=Path, help="RSNA label CSV for --data (without it: images only)")
    parser.add_argument("--studies", type=int, default=20, help="phantom studies without --data (~18 slices each)")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dataloader-workers", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="minimum timed seconds of the per-core loops")
    add_ray_flags(parser)
    args = parser.parse_args(argv)

    import ray

    with tempfile.TemporaryDirectory(prefix="raysys-bench-") as tmp:
        data, labels = input_data(args.data, args.studies, Path(tmp))
        labels = args.labels if args.data is not None else labels
        columns = ["image", "label"] if labels else ["image"]
        cores = init_ray(args.address, args.num_cpus)
        try:
            found = rdata.scan(str(data), str(labels) if labels else None, training=False, max_error_fraction=1.0)
            index, size, bs = found.index, args.size, args.batch_size
            log(f"{len(index)} usable images, {len(found.errors)} excluded; Ray cluster has {cores} CPUs")

            dataset = DecodeAugment(index, size, labels=bool(labels))
            paths = dataset.paths
            decode = lambda i: dicom_to_image(paths[i], WINDOWS, size)  # noqa: E731
            per_core = per_core_rate(decode, len(paths), args.min_seconds, "per_core")
            per_core_aug = per_core_rate(dataset.__getitem__, len(dataset), args.min_seconds, "per_core+aug")
            loader = dataloader_rate(dataset, bs, args.dataloader_workers)

            def augmented(rows):
                ds = rdata.image_dataset(rows, found, windows=WINDOWS, size=size, with_labels=bool(labels))
                return rdata.augment_dataset(ds, AugmentConfig(), seed=0, epoch=1)

            ray_s = timed_epoch(augmented, index, columns, bs, "ray_data")
            # A second epoch on the same cluster: worker processes have started and imported by now,
            # as they have for every epoch of a real run but its first.
            warm_s = timed_epoch(augmented, index, columns, bs, "ray_data_warm")

            cache = Path(tmp) / "cache"
            start = time.perf_counter()
            stats = rdata.prepare(DataConfig(data=str(data), labels=str(labels) if labels else "", windows=WINDOWS,
                                             image_size=size, max_error_fraction=1.0), str(cache))
            prepare_s = time.perf_counter() - start
            log(f"{'prepare':14s} {stats['images']} images  {prepare_s:6.2f} s")
            cached = rdata.scan(str(cache), str(cache / "labels.csv") if labels else None, training=False,
                                max_error_fraction=1.0)

            def plain(source):
                return lambda rows: rdata.image_dataset(rows, source, windows=WINDOWS, size=size,
                                                        with_labels=bool(labels))

            dicom_s = timed_epoch(plain(found), index, columns, bs, "dicom_epoch")
            cache_s = timed_epoch(plain(cached), cached.index.loc[index.index], columns, bs, "cache_epoch")
            shard_rows = cached.index.loc[index.index].groupby("shard", sort=False).size().tolist()
            shape = (len(parse_windows(WINDOWS)), size, size)
            def floor(rows):  # the timed epoch: the cache epoch's shards; timed_epoch's warm-up: one small task
                return floor_dataset(shard_rows if len(rows) == len(index) else [len(rows)], shape, bool(labels),
                                     DataConfig().decode_cpus)

            floor_s = timed_epoch(floor, index, columns, bs, "floor_epoch")
        finally:
            ray.shutdown()

    images = len(index)
    result = {
        "ray_data_ips": round(images / ray_s, 1),
        "ray_data_warm_ips": round(images / warm_s, 1),
        "per_core_ips": round(per_core, 1),
        "per_core_x_cores_ips": round(per_core * cores, 1),
        "per_core_augmented_ips": round(per_core_aug, 1),
        "cores": cores,
        "dataloader_ips": round(loader, 1),
        "dataloader_workers": args.dataloader_workers,
        "ray_data_vs_dataloader": round(images / ray_s / loader, 2),
        "ray_data_vs_ideal": round(images / ray_s / (per_core_aug * cores), 2),
        "ray_data_warm_vs_dataloader": round(images / warm_s / loader, 2),
        "ray_data_warm_vs_ideal": round(images / warm_s / (per_core_aug * cores), 2),
        "dicom_epoch_s": round(dicom_s, 3),
        "cache_epoch_s": round(cache_s, 3),
        "cache_speedup": round(dicom_s / cache_s, 2),
        "floor_epoch_s": round(floor_s, 3),
        "cache_speedup_ceiling": round(dicom_s / floor_s, 2),
        "cache_shards": len(shard_rows),
        "prepare_s": round(prepare_s, 3),
        "cache_bytes_per_image": round(stats["cache_bytes_per_image"]),
        "dicom_bytes_per_image": round(stats["dicom_bytes_per_image"]),
        "images": images,
        "excluded_files": len(found.errors),
        "size": size,
        "batch_size": bs,
        "labels": bool(labels),
        "data": str(args.data) if args.data else f"phantom(studies={args.studies}, size=512, seed=0)",
        **machine(),
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
