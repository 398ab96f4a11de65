"""Batch inference on Ray Data: a checkpoint over a folder of DICOMs -> submission CSV; evaluation reports."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from raysys import data as rdata
from raysys.labels import LABELS, read_labels, sample_image_ids, write_submission
from raysys.metrics import report
from raysys.model import load_checkpoint, read_meta
from raysys.presets import to_model_input

log = logging.getLogger(__name__)


class Predictor:
    """map_batches actor: loads the checkpoint once, then (B, C, S, S) uint8 -> (B, 6) probabilities."""

    def __init__(self, checkpoint: str, tta: str = "none"):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_checkpoint(checkpoint, self.device).model
        self.tta = tta

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        return {"image_id": batch["image_id"], "probabilities": infer(self.model, batch["image"], self.device, self.tta)}


def infer(model, images: np.ndarray | torch.Tensor, device: torch.device, tta: str = "none") -> np.ndarray:
    """Sigmoid probabilities (B, 6) float32 for uint8 images (B, C, S, S); tta="hflip" averages a mirrored pass."""
    contract = model.contract
    x = to_model_input(torch.as_tensor(images).to(device), contract.mean, contract.std)
    with torch.inference_mode():
        p = torch.sigmoid(model(x).float())
        if tta == "hflip":
            p = (p + torch.sigmoid(model(torch.flip(x, dims=[3])).float())) / 2
    return p.cpu().numpy()


@dataclass(frozen=True)
class Predictions:
    frame: pd.DataFrame  # image_id + LABELS probability columns, one row per readable image
    errors: pd.DataFrame  # unreadable files (image_id, path, reason)
    seconds: float


def predict(
    checkpoint: str,
    data: str,
    *,
    batch_size: int = 32,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    tta: str = "none",
    max_error_fraction: float = 1.0,
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> Predictions:
    """Score every readable image under `data` with the checkpoint's own preprocessing."""
    if tta not in ("none", "hflip"):
        raise ValueError(f"tta must be none or hflip, got {tta!r}")
    meta = read_meta(checkpoint)
    found = rdata.scan(data, training=False, max_error_fraction=max_error_fraction, run_dir=run_dir)
    start = time.perf_counter()
    ds = rdata.image_dataset(found.index, found, windows=meta["windows"], size=meta["image_size"], with_labels=False)
    resources = {"num_gpus": gpus_per_actor} if gpus_per_actor > 0 else {"num_cpus": 1}
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "tta": tta},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )
    ids, probs, total, shown = [], [], len(found.index), start
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids.extend(batch["image_id"])
        probs.append(batch["probabilities"])
        now = time.perf_counter()
        if progress and (now - shown > 5 or len(ids) == total):
            rate = len(ids) / (now - start)
            print(f"[predict] {len(ids)}/{total} images  {rate:.1f} img/s  ETA {(total - len(ids)) / rate:.0f}s",
                  flush=True)
            shown = now
    frame = pd.DataFrame(np.concatenate(probs) if probs else np.zeros((0, 6)), columns=list(LABELS))
    frame.insert(0, "image_id", [str(i) for i in ids])
    if frame["image_id"].duplicated().any() or len(frame) != total:
        raise RuntimeError(f"inference returned {len(frame)} rows for {total} images")  # never pad or drop
    return Predictions(frame=frame, errors=found.errors, seconds=time.perf_counter() - start)


def submission(
    predictions: Predictions,
    out: str | Path,
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
        sample_ids = pd.read_csv(sample_submission, usecols=["ID"])["ID"].astype(str).tolist()
        wanted = sample_image_ids(sample_ids)
        missing = [i for i in wanted if i not in frame.index]
        if missing:
            unreadable = predictions.errors.set_index("image_id")["reason"].to_dict()
            listed = pd.DataFrame({"image_id": missing,
                                   "reason": [unreadable.get(i, "not found in the data") for i in missing]})
            errors_path = Path(out).with_name("errors.csv")
            listed.to_csv(errors_path, index=False)
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


def evaluate(predictions: Predictions, labels: str, checkpoint: str, out_dir: str | Path) -> dict:
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
    metrics = report(y, p, y_train=None if prior is None else np.array([prior]))
    metrics["prior_source"] = "training split" if prior is not None else "these labels"
    metrics["unreadable_files"] = int(len(predictions.errors))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    roc_plot(out_dir / "roc.png", y, p)
    calibration_plot(out_dir / "calibration.png", y, p)
    return metrics
