"""The study-context stage in plain torch: a bidirectional GRU over each series' per-slice CNN outputs.

A bleed spans several adjacent slices; a slice's own CNN score misses what its neighbours show. The
sequence model reads one series at a time, slices ordered by position (raysys.data.order_series), and
corrects each slice's CNN logits from its context: logits = cnn_logits + correction, with the
correction's last layer starting at zero, so training starts from the CNN's own scores and can only
move away from them where context helps. The loss is the competition metric (WeightedBCE), over real
slices only (padding is masked out).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from raysys.engine import WeightedBCE
from raysys.labels import LABELS


class SeriesGRU(nn.Module):
    """(B, T, D) slice features + (B, T, 6) CNN logits + (B, T) mask -> (B, T, 6) logits."""

    def __init__(self, features: int, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(features + len(LABELS), hidden), nn.ReLU(), nn.Dropout(dropout))
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.correct = nn.Linear(2 * hidden, len(LABELS))
        nn.init.zeros_(self.correct.weight)  # starts as the CNN: the correction is learned, not assumed
        nn.init.zeros_(self.correct.bias)

    def forward(self, features: torch.Tensor, cnn_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.project(torch.cat([features, cnn_logits], dim=-1))
        lengths = mask.sum(dim=1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return cnn_logits + self.correct(out)


def pad_series(series: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Series of different lengths as one padded batch.

    Each item holds `features` (T, D) float32 and `cnn_logits` (T, 6), optionally `label` (T, 6), in slice
    order. Returns the same keys padded to the longest T, plus `mask` (B, T) bool, True on real slices.
    """
    longest = max(len(s["features"]) for s in series)
    out = {}
    for key in ("features", "cnn_logits", "label"):
        if key not in series[0]:
            continue
        width = series[0][key].shape[1]
        batch = np.zeros((len(series), longest, width), np.float32)
        for i, s in enumerate(series):
            batch[i, : len(s[key])] = s[key]
        out[key] = torch.from_numpy(batch)
    mask = np.zeros((len(series), longest), bool)
    for i, s in enumerate(series):
        mask[i, : len(s["features"])] = True
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
        out.extend(p[: len(s["features"])] for p, s in zip(probabilities, chunk))
    return out
