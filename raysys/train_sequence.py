"""The sequence stage on Ray: a CNN's per-slice outputs by Ray Data batch inference, then the BiGRU with Ray Train.

`fit_sequence(cfg)` scans and splits the data exactly as CNN training does (same patients on the same side
for the same data, seed and val_fraction), runs the CNN checkpoint `cfg.sequence.cnn` over every labelled
image in an actor pool (GPU when the run has one), groups the outputs into series ordered by position, and
trains raysys.sequence.SeriesGRU on the training series, one checkpoint per epoch ranked by the validation
series' weighted log loss. The best is exported with its CNN as one self-contained directory, `<run>/best`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from raysys import data as rdata
from raysys import storage
from raysys.config import Config, InferenceConfig, InputError, from_dict, save_config
from raysys.engine import validation_metrics
from raysys.labels import LABELS
from raysys.model import read_meta
from raysys.predict import Embedder, run_model
from raysys.runtime import largest_node_cpus
from raysys.sequence import (
    SEQUENCE_FILE,
    SeriesGRU,
    cnn_reference,
    export_sequence,
    is_sequence,
    pad_series,
    patience_spent,
    save_sequence,
    score_series,
    series_items,
    sigmoid,
    train_sequence_epoch,
)
from raysys.tracking import EpochLog, finish_mlflow, log_epoch, mlflow_run, worker_mlflow
from raysys.train import (
    SCORE,
    SPLIT_FIELDS,
    SPLIT_KEYS,
    FitResult,
    Split,
    _broadcast,
    _flatten,
    _mean_across_workers,
    _resume,
    check_relaunch,
    epoch_seed,
    finish,
    load_split,
    run_dir_for,
)

# What a relaunch of a sequence run cannot change (see raysys.train.check_relaunch).
FIXED_ON_RESUME = (*SPLIT_KEYS, "sequence.cnn", "sequence.lr", "sequence.decay", "sequence.weight_decay",
                   "sequence.hidden", "sequence.features")

log = logging.getLogger(__name__)

BEST_DIR = "best"  # the exported, self-contained sequence checkpoint inside the run directory


@dataclass(frozen=True)
class SeriesData:
    """The sequence stage's input, computed once (a sweep's trials share it): the split and its series."""

    split: Split
    train: list[dict]  # series items (raysys.sequence.series_items) of the training side
    val: list[dict]
    cnn: dict  # cnn_reference of the CNN checkpoint
    cnn_meta: dict


def prepare_series(cfg: Config, run_dir: str | None = None) -> SeriesData:
    """Check the CNN checkpoint, scan and split the data like CNN training, embed every image with the CNN."""
    s = cfg.sequence
    if not s.cnn:
        raise InputError("the sequence stage needs the trained CNN: --checkpoint CNN_DIR (a train run's or sweep's "
                         "best checkpoint)")
    cnn_meta = read_meta(s.cnn)
    if is_sequence(cnn_meta):
        raise InputError(f"{s.cnn} is a sequence stage already; give the CNN checkpoint it was trained on")
    _warn_if_split_differs(cfg, s.cnn)
    split = load_split(cfg, run_dir)
    train_items, val_items = embed_split(cfg, split, cnn_meta)
    return SeriesData(split, train_items, val_items, cnn_reference(s.cnn), cnn_meta)


def fit_sequence(cfg: Config, callbacks: list | None = None) -> FitResult:
    """Embed, then train the sequence stage (a relaunch with the same name resumes); best exported to <run>/best."""
    check_relaunch(cfg, FIXED_ON_RESUME)
    return fit_series(cfg, prepare_series(cfg, run_dir_for(cfg)), callbacks)


def fit_series(cfg: Config, data: SeriesData, callbacks: list | None = None, export: bool = True) -> FitResult:
    """Train the GRU on prepared series with Ray Train; with `export`, the best as a self-contained <run>/best."""
    s, t = cfg.sequence, cfg.train
    run_dir = run_dir_for(cfg)
    save_config(cfg, run_dir)
    data.split.save(run_dir)
    features = data.train[0]["features"].shape[1] if s.features else 0
    tracked = mlflow_run(cfg, run_dir) if export else None  # a sweep's trials are tracked by the sweep
    trainer = TorchTrainer(
        sequence_loop,
        train_loop_config={"cfg": cfg.to_dict(), "features": features, "cnn": data.cnn, "cnn_meta": data.cnn_meta,
                           "mlflow_run_id": tracked, "train": _shares(data.train, s.features, t.workers),
                           "val": ray.put(_kept(data.val, s.features))},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.workers, use_gpu=t.gpus_per_worker > 0,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.gpus_per_worker > 0 else {})}),
        run_config=ray.train.RunConfig(
            name=t.name, storage_path=t.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                                         checkpoint_score_attribute=SCORE,
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks, logging_config=ray.LoggingConfig(log_level="WARNING")),
    )
    result = finish(run_dir, trainer.fit())  # Train's controller polls every runtime.TRAIN_POLL_S: reports are quick
    if not export:
        return result
    best = export_sequence(result.best_checkpoint, storage.join(run_dir, BEST_DIR))
    finish_mlflow(cfg, tracked, best)
    log.info("sequence stage: best checkpoint %s (epoch %d, %s %.4f)", best, result.best_metrics["epoch"], SCORE,
             result.best_metrics[SCORE])
    return FitResult(run_dir=run_dir, best_checkpoint=best, best_metrics=result.best_metrics, history=result.history)


def embed_split(cfg: Config, split, cnn_meta: dict) -> tuple[list[dict], list[dict]]:
    """The CNN's features and logits for every image of the split, as series items (training, validation).

    Images are read with the CNN's own windows and size (its meta.json), whatever the data section says."""
    index = pd.concat([split.train, split.val], ignore_index=True)
    ds = rdata.image_dataset(index, split.source, windows=cnn_meta["windows"], size=cnn_meta["image_size"],
                             with_labels=False, decode_cpus=cfg.data.decode_cpus,
                             neighbors=cnn_meta.get("neighbors", 0))
    pool = embedding_pool(cfg, ray.cluster_resources().get("CPU", 0.0), largest_node_cpus())
    start = time.perf_counter()
    out = run_model(ds, Embedder, {"checkpoint": cfg.sequence.cnn, "features": cfg.sequence.features}, pool,
                    len(index), "sequence: CNN embeddings")
    row = pd.Series(np.arange(len(out["image_id"])), index=[str(i) for i in out["image_id"]])
    logits = out["logits"]
    items = []
    for side in (split.train, split.val):
        ordered = rdata.order_series(side.assign(row=row.loc[side["image_id"].astype(str)].to_numpy()))
        items.append(series_items(ordered, out["features"], logits, labels=True))
    val_rows = row.loc[split.val["image_id"].astype(str)].to_numpy()
    cnn_val = validation_metrics(split.val[list(LABELS)].to_numpy(np.float64), sigmoid(logits[val_rows]))
    log.info("sequence: %d images embedded in %.0fs; %d training / %d validation series; the CNN alone scores "
             "%s %.4f on the validation series", len(index), time.perf_counter() - start, len(items[0]),
             len(items[1]), SCORE, cnn_val[SCORE])
    return items[0], items[1]


def embedding_pool(cfg: Config, cluster_cpus: float, node_cpus: float | None = None) -> InferenceConfig:
    """The embedding actor pool: one actor per training worker (a GPU each where training has them). On CPUs the
    actors share what decoding leaves (at least half a CPU each, no more than one node holds), so no more actors
    than leave a decode task room, or they would wait for images forever; each runs as many torch threads as it
    holds CPUs, rounded up (InferenceConfig.threads)."""
    t = cfg.train
    pool = InferenceConfig(actors=t.workers, gpus_per_actor=t.gpus_per_worker, cpus_per_actor=max(t.cpus_per_worker, 0.5))
    if pool.gpus_per_actor > 0:
        return pool
    free = cluster_cpus - cfg.data.decode_cpus
    actors = max(1, min(pool.actors, int(free // pool.cpus_per_actor)))
    largest = (node_cpus if node_cpus is not None else cluster_cpus) - cfg.data.decode_cpus
    return replace(pool, actors=actors, cpus_per_actor=max(pool.cpus_per_actor, min(free / actors, largest)))


def _kept(items: list[dict], features: bool) -> list[dict]:
    """What the GRU reads of each series: features (T, F) float16 (unless logits only), cnn_logits and label."""
    keys = ("features", "cnn_logits", "label") if features else ("cnn_logits", "label")
    return [{k: item[k] for k in keys} for item in items]


def _shares(items: list[dict], features: bool, workers: int) -> list[ray.ObjectRef]:
    """The training series dealt over the workers, each worker's share put in the object store once.

    The series are small (2048 float16 features per slice: 12 MB for 160 phantom series, ~3 GB for RSNA's 750,000
    slices), so a worker holds its share in memory and reshuffles it each epoch; a Ray Dataset here cost a
    streaming execution per epoch and its actors (~0.15 s an epoch and seconds of start-up on 2 CPU cores).
    Every share holds the same number of series, so DDP's workers step in lockstep: a share one short repeats
    a series from the front of the list."""
    kept = _kept(items, features)
    shares = [kept[rank::workers] for rank in range(workers)]
    size = max(len(share) for share in shares)
    return [ray.put(share + [kept[i % len(kept)] for i in range(size - len(share))]) for share in shares]


def _warn_if_split_differs(cfg: Config, cnn: str) -> None:
    """The stage validates on the CNN's validation patients only when both runs split alike."""
    cnn_data = (read_meta_config(cnn) or {}).get("data", {})
    differs = [k for k in SPLIT_FIELDS if k in cnn_data and cnn_data[k] != getattr(cfg.data, k)]
    if differs:
        log.warning("the CNN was trained with a different split (%s): some validation series of the sequence stage "
                    "hold slices the CNN trained on, so its validation score is optimistic",
                    ", ".join(f"{k} {cnn_data[k]} vs {getattr(cfg.data, k)}" for k in differs))


def read_meta_config(checkpoint: str) -> dict | None:
    import yaml

    from raysys.config import CONFIG_FILE

    path = storage.join(checkpoint, CONFIG_FILE)
    return yaml.safe_load(storage.read_text(path)) if storage.is_file(path) else None


# --- the worker loop (glue only: the work is in sequence.py) ---------------------------------


def sequence_loop(config: dict) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(config["cfg"])
    s, name = cfg.sequence, cfg.train.name
    rank, device = ray.train.get_context().get_world_rank(), ray.train.torch.get_device()
    torch.manual_seed(cfg.data.seed)
    model = ray.train.torch.prepare_model(SeriesGRU(config["features"], s.hidden, s.dropout))
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=s.decay)
    start, history = _resume(model, optimizer, scheduler, read=_read_sequence_state)
    share = ray.get(config["train"][rank])
    val = ray.get(config["val"]) if rank == 0 else None
    tag, epoch_seconds = f"[sequence {name}]", []
    if patience_spent([h[SCORE] for h in history], s.patience):
        start = s.epochs + 1  # a relaunch of a run that stopped early: nothing left to train
    if rank == 0 and history:
        print(f"{tag} resuming at epoch {start} of {s.epochs}" if start <= s.epochs else
              f"{tag} resuming: nothing left to train (it ran {history[-1]['epoch']} epochs)", flush=True)
    board = EpochLog(run_dir_for(cfg)) if rank == 0 else None
    mlflow = worker_mlflow(cfg, config.get("mlflow_run_id"))
    for epoch in range(start, s.epochs + 1):
        began, lr = time.perf_counter(), scheduler.get_last_lr()[0]
        torch.manual_seed(epoch_seed(cfg.data.seed, epoch, rank))  # dropout, as in raysys.train
        order = np.random.default_rng([cfg.data.seed, epoch]).permutation(len(share))  # reproducible, new each epoch
        batches = (pad_series([share[i] for i in order[j : j + s.batch_size]]) for j in range(0, len(order), s.batch_size))
        stats = train_sequence_epoch(model, batches, optimizer, device)
        scheduler.step()
        stats["train_loss"] = _mean_across_workers(stats["train_loss"], device)
        scores = None
        if rank == 0:
            plain = getattr(model, "module", model)
            p = np.concatenate(score_series(plain, val, device))
            scores = validation_metrics(np.concatenate([r["label"] for r in val]).astype(np.float64), p)
        scores = _broadcast(scores)
        epoch_seconds.append(time.perf_counter() - began)
        metrics = {"epoch": epoch, "lr": lr, **stats, **_flatten(scores), "epoch_seconds": epoch_seconds[-1]}
        history.append(metrics)
        # A checkpoint when the validation score improves, and at the end (what a resumed run starts from).
        improved = metrics[SCORE] < min((h[SCORE] for h in history[:-1]), default=float("inf"))
        so_far = [h[SCORE] for h in history]
        stop = patience_spent(so_far, s.patience)  # the same on every worker: the scores were broadcast
        if rank == 0 and (improved or stop or epoch == s.epochs):
            with tempfile.TemporaryDirectory() as tmp:
                save_sequence(tmp, model, cnn_meta=config["cnn_meta"], cnn=config["cnn"], config=cfg.to_dict(),
                              epoch=epoch, metrics={**metrics, "history": history}, optimizer=optimizer,
                              scheduler=scheduler)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        if rank == 0:
            eta = (s.epochs - epoch) * sum(epoch_seconds) / len(epoch_seconds)
            print(f"{tag} epoch {epoch}/{s.epochs}  lr {lr:.2e}  train_loss {stats['train_loss']:.4f}  "
                  f"{SCORE} {metrics[SCORE]:.4f}  {stats['train_slices']} slices  epoch {epoch_seconds[-1]:.1f}s  "
                  f"ETA {eta:.0f}s", flush=True)
            board.write(metrics)
            log_epoch(mlflow, metrics)
            if stop and epoch < s.epochs:
                best = history[int(np.argmin(so_far))]["epoch"]
                print(f"{tag} stopping after epoch {epoch}: no better {SCORE} than epoch {best}'s in {s.patience} "
                      f"epochs (sequence.patience)", flush=True)
        if stop:
            break
    if board is not None:
        board.close()


def _read_sequence_state(directory: str) -> dict:
    return torch.load(f"{directory}/{SEQUENCE_FILE}", map_location="cpu", weights_only=True)
