"""PNG figures people look at: slice previews, training curves, sweeps, ROC and calibration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raysys.labels import LABELS  # noqa: E402
from raysys.windowing import Window, format_windows  # noqa: E402


def preview(path: str | Path, image: np.ndarray, windows: Sequence[Window], title: str = "", caption: str = "") -> Path:
    """One slice in each of its windows, side by side. `image`: (C, S, S) uint8 or float in [0, 1]."""
    names = format_windows(windows).split(",")
    fig, axes = plt.subplots(1, len(windows), figsize=(3.2 * len(windows), 3.6), squeeze=False)
    for ax, channel, name, window in zip(axes[0], image, names, windows):
        ax.imshow(channel, cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
        ax.set_title(f"{name} ({window.center:g}/{window.width:g})", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    if caption:
        fig.text(0.5, 0.02, caption, ha="center", fontsize=8, family="monospace")
    fig.tight_layout(rect=(0, 0.06 if caption else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def format_probabilities(probabilities: Sequence[float], truth: Sequence[float] | None = None) -> str:
    """'epidural 0.02  ...' with the true label beside each probability when known."""
    parts = []
    for j, name in enumerate(LABELS):
        mark = "" if truth is None else f"({int(truth[j])})"
        parts.append(f"{name[:6]} {probabilities[j]:.2f}{mark}")
    return "  ".join(parts)


def curves(path: str | Path, history, score: str = "val_weighted_log_loss") -> Path:
    """Train loss and validation score per epoch (one row of `history` per epoch)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["train_loss"], "o-", label="train loss (weighted BCE)")
    ax.plot(history["epoch"], history[score], "s-", label=f"validation {score.removeprefix('val_')}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted log loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
