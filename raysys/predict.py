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
from raysys.engine import infer
from raysys.labels import LABELS, read_labels, sample_image_ids, write_submission
from raysys.metrics import summarize
from raysys.model import load_checkpoint, read_meta

log = logging.getLogger(__name__)


class Predictor:
    """map_batches actor: loads the checkpoint once, then (B, C, S, S) uint8 -> (B, 6) probabilities."""

    def __init__(self, checkpoint: str, tta: str = "none"):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_checkpoint(checkpoint, self.device).model
        self.tta = tta

    def __call__(self, batch: dict) -> dict:
        return {"image_id": batch["image_id"],
                "probabilities": infer(self.model, batch["image"], self.device, tta=self.tta)}


@dataclass(frozen=True)
class Predictions:
    frame: pd.DataFrame  # image_id + LABELS probability columns, one row per readable image
    errors: pd.DataFrame  # unreadable files (image_id, path, reason)
    seconds: float


def predict_folder(
    checkpoint: str,
    data: str,
    cfg: InferenceConfig = InferenceConfig(),
    *,
    run_dir: str | None = None,
    progress: bool = True,
) -> Predictions:
    """Score every readable image under `data` with the checkpoint's own preprocessing."""
    checkpoint, data = storage.resolve(checkpoint), storage.resolve(data)
    meta = read_meta(checkpoint)
    found = rdata.scan(data, training=False, max_error_fraction=cfg.max_error_fraction, run_dir=run_dir)
    start = time.perf_counter()
    ds = rdata.image_dataset(found.index, found, windows=meta["windows"], size=meta["image_size"], with_labels=False)
    resources = {"num_gpus": cfg.gpus_per_actor} if cfg.gpus_per_actor > 0 else {"num_cpus": cfg.cpus_per_actor}
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"checkpoint": checkpoint, "tta": cfg.tta},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        **resources,
    )
    ids, probs, total, shown = [], [], len(found.index), start
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids.extend(batch["image_id"])
        probs.append(batch["probabilities"])
        now = time.perf_counter()
        if progress and (now - shown > rdata.PROGRESS_EVERY_S or len(ids) == total):
            rate = len(ids) / (now - start)
            log.info("predict: %d/%d images  %.1f img/s  ETA %.0fs", len(ids), total, rate, (total - len(ids)) / rate)
            shown = now
    frame = pd.DataFrame(np.concatenate(probs) if probs else np.zeros((0, 6)), columns=list(LABELS))
    frame.insert(0, "image_id", [str(i) for i in ids])
    if frame["image_id"].duplicated().any() or len(frame) != total:
        raise RuntimeError(f"inference returned {len(frame)} rows for {total} images")  # never pad or drop
    return Predictions(frame=frame, errors=found.errors, seconds=time.perf_counter() - start)


def submission(
    predictions: Predictions,
    out: str,
    *,
    checkpoint: str,
    sample_submission: str | None = None,
    allow_missing: bool = False,
) -> pd.DataFrame:
    """Write the Kaggle CSV. With a sample, exactly its IDs in its order; images missing from the data
    or unreadable are listed in errors.csv beside `out` and fail unless allow_missing fills them
    with the training label prior."""
    frame = predictions.frame.set_index("image_id")
    sample_ids = None
    if sample_submission:
        sample_ids = pd.read_csv(storage.open_bytes(sample_submission), usecols=["ID"])["ID"].astype(str).tolist()
        wanted = sample_image_ids(sample_ids)
        missing = [i for i in wanted if i not in frame.index]
        if missing:
            unreadable = predictions.errors.set_index("image_id")["reason"].to_dict()
            listed = pd.DataFrame({"image_id": missing,
                                   "reason": [unreadable.get(i, "not found in the data") for i in missing]})
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
    """metrics.json (with the training prior's score beside the model's), roc.png and calibration.png."""
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
    storage.write_text(storage.join(out_dir, "metrics.json"), storage.to_json(metrics))
    roc_plot(storage.join(out_dir, "roc.png"), y, p)
    calibration_plot(storage.join(out_dir, "calibration.png"), y, p)
    return metrics
