"""Batch inference on Ray Data: a checkpoint over a folder of DICOMs -> submission CSV; evaluation reports."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray
import torch

from raysys import data as rdata
from raysys import storage
from raysys.config import InferenceConfig
from raysys.engine import embed, infer
from raysys.labels import LABELS, read_labels, sample_image_ids, write_submission
from raysys.metrics import summarize
from raysys.model import load_checkpoint, read_meta
from raysys.sequence import is_sequence, load_gru, score_rows, series_items, sigmoid, stored_features

log = logging.getLogger(__name__)


def _device(threads: int) -> torch.device:
    """An inference actor's device; on CPU it runs `threads` torch threads (InferenceConfig.threads: the CPUs it
    holds, rounded up, where Ray's OMP_NUM_THREADS rounds them down)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(threads)
    return torch.device("cpu")


class Predictor:
    """map_batches actor: loads the checkpoint once, then (B, C, S, S) uint8 -> (B, 6) probabilities."""

    def __init__(self, checkpoint: str, tta: str = "none", threads: int = 1):
        self.device = _device(threads)
        self.model = load_checkpoint(checkpoint, self.device).model
        self.tta = tta

    def __call__(self, batch: dict) -> dict:
        return {"image_id": batch["image_id"],
                "probabilities": infer(self.model, batch["image"], self.device, tta=self.tta)}


class Embedder:
    """map_batches actor: a checkpoint's CNN, loaded once; (B, C, S, S) uint8 -> its pooled features (B, F)
    float16 (F = 0 when `features` is False) and logits (B, 6) float32: the sequence stage's input."""

    def __init__(self, checkpoint: str, features: bool = True, threads: int = 1):
        self.device = _device(threads)
        self.model = load_checkpoint(checkpoint, self.device).model
        self.features = features

    def __call__(self, batch: dict) -> dict:
        features, logits = embed(self.model, batch["image"], self.device)
        kept = features if self.features else features[:, :0]
        return {"image_id": batch["image_id"], "features": stored_features(kept), "logits": logits}


@dataclass(frozen=True)
class Predictions:
    frame: pd.DataFrame  # image_id + LABELS probability columns, one row per readable image
    errors: pd.DataFrame  # unreadable files (image_id, path, reason)
    seconds: float
    cnn_frame: pd.DataFrame | None = None  # a sequence checkpoint's CNN alone, same rows (None for a CNN checkpoint)


def run_model(ds: ray.data.Dataset, actor: type, kwargs: dict, cfg: InferenceConfig, total: int, what: str,
              progress: bool = True) -> dict[str, np.ndarray]:
    """Every row of `ds` through `actor` (Predictor or Embedder) in an actor pool, collected on the driver:
    the actor's output columns concatenated, with a progress line (img/s, ETA) every PROGRESS_EVERY_S."""
    resources = {"num_gpus": cfg.gpus_per_actor} if cfg.gpus_per_actor > 0 else {"num_cpus": cfg.cpus_per_actor}
    ds = ds.map_batches(actor, fn_constructor_kwargs={**kwargs, "threads": cfg.threads}, batch_size=cfg.batch_size,
                        batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=cfg.actors), **resources)
    parts, done, start = {}, 0, time.perf_counter()
    shown = start
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
        done += len(batch["image_id"])
        now = time.perf_counter()
        if progress and (now - shown > rdata.PROGRESS_EVERY_S or done == total):
            rate = done / (now - start)
            log.info("%s: %d/%d images  %.1f img/s  ETA %.0fs", what, done, total, rate, (total - done) / rate)
            shown = now
    out = {key: np.concatenate(values) for key, values in parts.items()}
    if done != total or len(set(out.get("image_id", []))) != total:
        raise RuntimeError(f"{what} returned {done} rows for {total} images")  # never pad or drop
    return out


def predict_folder(
    checkpoint: str,
    data: str,
    cfg: InferenceConfig = InferenceConfig(),
    *,
    run_dir: str | None = None,
    progress: bool = True,
) -> Predictions:
    """Score every readable image under `data` with the checkpoint's own preprocessing.

    A sequence checkpoint scores each series in slice order (its CNN over every image in the actor pool, then
    the GRU over each series on the driver); rows stay one per image."""
    checkpoint, data = storage.resolve(checkpoint), storage.resolve(data)
    meta = read_meta(checkpoint)
    found = rdata.scan(data, training=False, max_error_fraction=cfg.max_error_fraction, run_dir=run_dir)
    start, total = time.perf_counter(), len(found.index)
    if total == 0:  # nothing readable: every file is in errors
        empty = _frame([], np.zeros((0, len(LABELS))))
        return Predictions(frame=empty, errors=found.errors, seconds=0.0, cnn_frame=empty if is_sequence(meta) else None)
    ds = rdata.image_dataset(found.index, found, windows=meta["windows"], size=meta["image_size"], with_labels=False,
                             neighbors=meta.get("neighbors", 0))
    cnn_frame = None
    if is_sequence(meta):
        if cfg.tta != "none":
            raise ValueError(f"{checkpoint}: test-time augmentation applies to CNN checkpoints only, not a sequence stage")
        out = run_model(ds, Embedder, {"checkpoint": checkpoint, "features": meta["sequence"]["features"] > 0},
                        cfg, total, "predict (CNN)", progress)
        ids = [str(i) for i in out["image_id"]]
        cnn_frame = _frame(ids, sigmoid(out["logits"]))
        probabilities = sequence_probabilities(checkpoint, found.index, ids, out["features"], out["logits"])
    else:
        out = run_model(ds, Predictor, {"checkpoint": checkpoint, "tta": cfg.tta}, cfg, total, "predict", progress)
        ids, probabilities = [str(i) for i in out["image_id"]], out["probabilities"]
    return Predictions(frame=_frame(ids, probabilities), errors=found.errors, seconds=time.perf_counter() - start,
                       cnn_frame=cnn_frame)


def sequence_probabilities(checkpoint: str, index: pd.DataFrame, ids: list[str], features: np.ndarray,
                           logits: np.ndarray) -> np.ndarray:
    """The sequence stage's (len(ids), 6) probabilities, row i for ids[i], from the CNN outputs of those images."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_gru(checkpoint, device)  # the CNN's outputs are in hand: its weights stay on disk
    rows = index.set_index("image_id").loc[ids].reset_index().assign(row=np.arange(len(ids)))
    items = series_items(rdata.order_series(rows), features.astype(np.float32), logits, labels=False)
    return score_rows(model, items, len(ids), device)


def _frame(ids: list[str], probabilities: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(probabilities if len(ids) else np.zeros((0, len(LABELS))), columns=list(LABELS))
    frame.insert(0, "image_id", ids)
    return frame


def submission(
    predictions: Predictions,
    out: str,
    *,
    checkpoint: str,
    sample_submission: str | None = None,
    allow_missing: bool = False,
) -> pd.DataFrame:
    """Write the Kaggle CSV. With a sample, exactly its IDs in its order; images of the sample missing from the
    data or unreadable are listed in errors.csv beside `out` (after every unreadable file) and fail unless
    allow_missing fills them with the training label prior."""
    frame = predictions.frame.set_index("image_id")
    sample_ids = None
    if sample_submission:
        sample_ids = pd.read_csv(storage.open_bytes(sample_submission), usecols=["ID"])["ID"].astype(str).tolist()
        wanted = sample_image_ids(sample_ids)
        missing = [i for i in wanted if i not in frame.index]
        if missing:
            # Every unreadable file (as the scan lists them), then the sample's images that are nowhere in the data.
            unreadable = set(predictions.errors["image_id"])
            absent = [i for i in missing if i not in unreadable]
            listed = pd.concat([predictions.errors, pd.DataFrame({"image_id": absent, "path": "",
                                                                  "reason": "not found in the data"})])
            errors_path = storage.sibling(out, "errors.csv")
            storage.write_text(errors_path, listed.to_csv(index=False))
            if not allow_missing:
                raise RuntimeError(f"{len(missing)} images of the sample submission have no prediction "
                                   f"(listed in {errors_path}); pass --allow-missing to fill them with the label prior")
            prior = read_meta(checkpoint).get("label_prior")
            if prior is None:
                raise RuntimeError(f"{checkpoint} has no label_prior to fill missing images with")
            log.warning("filling %d missing images with the training label prior (listed in %s)", len(missing), errors_path)
            frame = pd.concat([frame, pd.DataFrame([prior] * len(missing), index=missing, columns=list(LABELS))])
        frame = frame.loc[wanted]
    return write_submission(out, frame.index.tolist(), frame[list(LABELS)].to_numpy(), sample_ids)


def evaluate_predictions(predictions: Predictions, labels: str, checkpoint: str, out_dir: str) -> dict:
    """metrics.json (with the training prior's score beside the model's, and for a sequence checkpoint its CNN's
    alone under `cnn`), roc.png and calibration.png."""
    from raysys.report import calibration_plot, roc_plot

    table = read_labels(labels)
    frame = predictions.frame.set_index("image_id")
    missing = frame.index.difference(table.index)
    if len(missing):
        raise ValueError(f"{labels}: no labels for {len(missing)} predicted images, e.g. {list(missing[:3])}")
    y = table.loc[frame.index, list(LABELS)].to_numpy(np.float64)
    p = frame[list(LABELS)].to_numpy(np.float64)
    prior = read_meta(checkpoint).get("label_prior")
    metrics = summarize(y, p, y_train=None if prior is None else np.array([prior]))
    metrics["prior_source"] = "training split" if prior is not None else "these labels"
    metrics["unreadable_files"] = int(len(predictions.errors))
    if predictions.cnn_frame is not None:  # a sequence checkpoint: its CNN alone on the same images, side by side
        p_cnn = predictions.cnn_frame.set_index("image_id").loc[frame.index, list(LABELS)].to_numpy(np.float64)
        metrics["cnn"] = {k: v for k, v in summarize(y, p_cnn).items() if not k.startswith("prior_")}
        metrics["sequence_vs_cnn"] = metrics["weighted_log_loss"] / metrics["cnn"]["weighted_log_loss"]
    storage.write_text(storage.join(out_dir, "metrics.json"), storage.to_json(metrics))
    roc_plot(storage.join(out_dir, "roc.png"), y, p)
    calibration_plot(storage.join(out_dir, "calibration.png"), y, p)
    return metrics
