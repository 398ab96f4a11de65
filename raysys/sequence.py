"""The study-context stage in plain torch: a bidirectional GRU over each series' per-slice CNN outputs,
and its checkpoint directory.

A bleed spans several adjacent slices; a slice's own CNN score misses what its neighbours show. The
sequence model reads one series at a time, slices ordered by position (raysys.data.order_series), and
recalibrates and corrects each slice's CNN logits from its context (SeriesGRU), starting as the CNN's
own scores and moving away from them where the series helps. The loss is the competition metric
(WeightedBCE), over real slices only (padding is masked out). A sequence checkpoint names its CNN by
content hash; an exported one holds it under cnn/. Ray's part is in raysys.train_sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from raysys import storage
from raysys.config import CONFIG_FILE
from raysys.engine import WeightedBCE
from raysys.labels import LABELS
from raysys.model import META_FILE, STATE_FILE, Checkpoint, load_checkpoint, read_meta

STAGE = "sequence"  # meta.json's `stage` in a sequence checkpoint (a CNN checkpoint has none)
SEQUENCE_FILE = "sequence.pt"  # the GRU's weights + optimizer + scheduler + epoch
CNN_DIR = "cnn"  # an exported sequence checkpoint holds its CNN here


class SeriesGRU(nn.Module):
    """(B, T, D) slice features + (B, T, 6) CNN logits + (B, T) mask -> (B, T, 6) logits.

    logits = scale * cnn_logits + shift + correction(context): a per-label recalibration of the CNN (it saw
    balanced epochs and may be over- or under-confident on real prevalence) plus what the series adds. Both
    start as the identity, so an untrained stage is the CNN itself.
    """

    LOGIT_CLIP = 20.0  # the GRU reads CNN logits clipped here: a wildly confident CNN must not saturate it

    def __init__(self, features: int, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.features, self.hidden, self.dropout = features, hidden, dropout
        self.project = nn.Sequential(nn.Linear(features + len(LABELS), hidden), nn.ReLU(), nn.Dropout(dropout))
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.correct = nn.Linear(2 * hidden, len(LABELS))
        nn.init.zeros_(self.correct.weight)  # starts as the CNN: the correction is learned, not assumed
        nn.init.zeros_(self.correct.bias)
        self.scale = nn.Parameter(torch.ones(len(LABELS)))
        self.shift = nn.Parameter(torch.zeros(len(LABELS)))

    def forward(self, features: torch.Tensor, cnn_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        clipped = cnn_logits.clamp(-self.LOGIT_CLIP, self.LOGIT_CLIP)
        x = self.project(torch.cat([features, clipped], dim=-1))
        lengths = mask.sum(dim=1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.scale * cnn_logits + self.shift + self.correct(out)


def pad_series(series: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Series of different lengths as one padded batch.

    Each item holds `cnn_logits` (T, 6), `features` (T, D) (absent for a logits-only model: D = 0) and
    optionally `label` (T, 6), in slice order. Returns `features`, `cnn_logits` (and `label`) padded to the
    longest T, plus `mask` (B, T) bool, True on real slices.
    """
    lengths = [len(s["cnn_logits"]) for s in series]
    longest = max(lengths)
    out = {}
    for key in ("features", "cnn_logits", "label"):
        if key not in series[0]:
            continue
        batch = np.zeros((len(series), longest, series[0][key].shape[1]), np.float32)
        for i, s in enumerate(series):
            batch[i, : lengths[i]] = s[key]
        out[key] = torch.from_numpy(batch)
    out.setdefault("features", torch.zeros((len(series), longest, 0)))
    mask = np.arange(longest)[None, :] < np.array(lengths)[:, None]
    out["mask"] = torch.from_numpy(mask)
    return out


def masked_weighted_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WeightedBCE over the real slices of a padded batch: each slice counts once, padding not at all."""
    return WeightedBCE().to(logits.device)(logits[mask], targets[mask])


def train_sequence_epoch(model: SeriesGRU, batches: Iterable[dict[str, torch.Tensor]],
                         optimizer: torch.optim.Optimizer, device: torch.device) -> dict:
    """One pass over padded series batches (pad_series); returns the slice-weighted mean training loss."""
    model.train()
    total, slices = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = masked_weighted_bce(model(batch["features"], batch["cnn_logits"], batch["mask"]), batch["label"],
                                   batch["mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = int(batch["mask"].sum())
        total, slices = total + float(loss.detach()) * n, slices + n
    return {"train_loss": total / max(slices, 1), "train_slices": slices}


@torch.no_grad()
def score_series(model: SeriesGRU, series: Sequence[dict[str, np.ndarray]], device: torch.device,
                 batch_size: int = 32) -> list[np.ndarray]:
    """Per-slice probabilities (T, 6) for each series, in its slice order; one array per series."""
    model.eval()
    out = []
    for start in range(0, len(series), batch_size):
        chunk = series[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_series(chunk).items()}
        probabilities = torch.sigmoid(model(batch["features"], batch["cnn_logits"], batch["mask"])).cpu().numpy()
        out.extend(p[: len(s["cnn_logits"])] for p, s in zip(probabilities, chunk))
    return out


def epochs_since_best(scores: Sequence[float]) -> int:
    """Epochs after the best (lowest; the first of equals) score: 0 when the last epoch is the best."""
    return len(scores) - 1 - int(np.argmin(scores)) if len(scores) else 0


def patience_spent(scores: Sequence[float], patience: int) -> bool:
    """True when `patience` epochs (> 0) have passed without a better score than the best: time to stop."""
    return patience > 0 and epochs_since_best(scores) >= patience


FLOAT16_MAX = 65504.0


def stored_features(features: np.ndarray) -> np.ndarray:
    """Pooled CNN features as the stage keeps them: float16 (half the memory of RSNA's 750,000 x 2048),
    clipped to float16's range so an extreme (untrained) CNN gives large values rather than inf."""
    return np.clip(features, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities of logits, float64, without overflow warnings for very confident ones."""
    return 1 / (1 + np.exp(-np.clip(np.asarray(logits, np.float64), -50, 50)))


def series_items(ordered: pd.DataFrame, features: np.ndarray, logits: np.ndarray, *, labels: bool) -> list[dict]:
    """One item per series, slices in order: `series`, `row` (T,), `image_id` (T,), `features` (T, F),
    `cnn_logits` (T, 6) and, with labels, `label` (T, 6).

    ordered: raysys.data.order_series output whose `row` column indexes `features` and `logits`.
    """
    items = []
    for key, group in ordered.groupby("series", sort=False):
        rows = group["row"].to_numpy()
        item = {"series": key, "row": rows, "image_id": group["image_id"].to_numpy(str), "features": features[rows],
                "cnn_logits": logits[rows].astype(np.float32)}
        if labels:
            item["label"] = group[list(LABELS)].to_numpy(np.float32)
        items.append(item)
    return items


def score_rows(model: SeriesGRU, items: Sequence[dict], rows: int, device: torch.device) -> np.ndarray:
    """score_series of `items`, put back in row order: (rows, 6) probabilities, row i from the item holding it."""
    out = np.full((rows, len(LABELS)), np.nan, np.float32)
    for item, probabilities in zip(items, score_series(model, items, device)):
        out[item["row"]] = probabilities
    if np.isnan(out).any():
        raise ValueError(f"{int(np.isnan(out).any(axis=1).sum())} of {rows} rows are in no series")
    return out


def file_sha256(path: str) -> str:
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def cnn_reference(cnn_dir: str) -> dict:
    """How a sequence checkpoint names its CNN: the directory and its weights' content hash."""
    return {"dir": cnn_dir, "sha256": file_sha256(storage.join(cnn_dir, STATE_FILE))}


def save_sequence(directory: str | Path, model: SeriesGRU, *, cnn_meta: dict, cnn: dict, config: dict, epoch: int,
                  metrics: dict, optimizer: torch.optim.Optimizer | None = None, scheduler=None) -> Path:
    """Write sequence.pt, meta.json and config.yaml of a sequence stage into the local `directory`.

    meta.json keeps the CNN's preprocessing (windows, size, contract), so every reader of a checkpoint's
    meta treats both kinds alike, plus `stage`, the GRU's shape and `cnn` (cnn_reference).
    """
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = getattr(model, "module", model)
    torch.save({"model": plain.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
                "scheduler": scheduler.state_dict() if scheduler else None, "epoch": epoch}, directory / SEQUENCE_FILE)
    keep = ("labels", "windows", "image_size", "contract", "aux_logits", "neighbors", "logit_offset", "label_prior")
    meta = {**{k: cnn_meta[k] for k in keep if k in cnn_meta}, "stage": STAGE,
            "sequence": {"features": plain.features, "hidden": plain.hidden, "dropout": plain.dropout},
            "cnn": {**cnn, "epoch": cnn_meta.get("epoch"),
                    "val_weighted_log_loss": cnn_meta.get("metrics", {}).get("val_weighted_log_loss")},
            "epoch": epoch, "metrics": metrics}
    (directory / META_FILE).write_text(storage.to_json(meta))
    with open(directory / CONFIG_FILE, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return directory


def export_sequence(checkpoint: str, out: str) -> str:
    """A self-contained copy of a sequence checkpoint: its files, plus its CNN under cnn/ (weights, meta, config;
    the CNN's optimizer state is left behind), with meta.json pointing there."""
    import io

    meta = read_meta(checkpoint)
    cnn_dir = resolve_cnn(checkpoint, meta)
    storage.copy_tree(checkpoint, out)
    state = torch.load(storage.open_bytes(storage.join(cnn_dir, STATE_FILE)), map_location="cpu", weights_only=True)
    buffer = io.BytesIO()
    torch.save({"model": state["model"], "optimizer": None, "scheduler": None, "epoch": state["epoch"]}, buffer)
    storage.write_bytes(storage.join(out, CNN_DIR, STATE_FILE), buffer.getvalue())
    for name in (META_FILE, CONFIG_FILE):
        if storage.is_file(storage.join(cnn_dir, name)):
            storage.write_bytes(storage.join(out, CNN_DIR, name), storage.read_bytes(storage.join(cnn_dir, name)))
    meta["cnn"] = {**meta["cnn"], "dir": CNN_DIR, "source": meta["cnn"]["dir"],
                   "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
    storage.write_text(storage.join(out, META_FILE), storage.to_json(meta))
    return out


def resolve_cnn(checkpoint: str, meta: dict) -> str:
    """The CNN directory a sequence checkpoint names (relative to the checkpoint or absolute), hash checked."""
    ref = meta["cnn"]
    cnn_dir = ref["dir"] if storage.is_uri(ref["dir"]) or Path(ref["dir"]).is_absolute() else \
        storage.join(checkpoint, ref["dir"])
    if not storage.is_file(storage.join(cnn_dir, STATE_FILE)):
        raise FileNotFoundError(f"{checkpoint}: its CNN checkpoint {cnn_dir} is missing")
    found = file_sha256(storage.join(cnn_dir, STATE_FILE))
    if found != ref["sha256"]:
        raise ValueError(f"{checkpoint}: the CNN weights at {cnn_dir} changed since the sequence stage was trained "
                         f"(sha256 {found[:12]}, expected {ref['sha256'][:12]})")
    return cnn_dir


@dataclass
class SequenceCheckpoint:
    """A loaded sequence checkpoint: its CNN (eval mode), the GRU (eval mode), and meta.json."""

    cnn: Checkpoint
    model: SeriesGRU
    meta: dict


def is_sequence(meta: dict) -> bool:
    return meta.get("stage") == STAGE


def load_sequence(directory: str | Path, device: str | torch.device = "cpu") -> SequenceCheckpoint:
    """Both stages of a sequence checkpoint, in eval mode on `device` (the CNN's hash checked)."""
    local = storage.local_dir(directory)
    model, meta = load_gru(local, device)
    return SequenceCheckpoint(cnn=load_checkpoint(resolve_cnn(str(local), meta), device), model=model, meta=meta)


def load_gru(directory: str | Path, device: str | torch.device = "cpu") -> tuple[SeriesGRU, dict]:
    """The GRU of a sequence checkpoint (eval mode, on `device`) and its meta.json, without loading its CNN:
    for a process that has the CNN's outputs already (batch predict's driver)."""
    local = storage.local_dir(directory)
    meta = read_meta(local)
    if not is_sequence(meta):
        raise ValueError(f"{directory}: a CNN checkpoint, not a sequence stage (no stage: {STAGE} in {META_FILE})")
    shape = meta["sequence"]
    model = SeriesGRU(shape["features"], shape["hidden"], shape["dropout"])
    state = torch.load(local / SEQUENCE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta
