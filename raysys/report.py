"""PNG figures people look at: slice previews, training curves, sweeps, ROC and calibration."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raysys import storage  # noqa: E402
from raysys.labels import LABELS  # noqa: E402
from raysys.windowing import Window, format_windows  # noqa: E402


def _save(fig, path: str | Path) -> str:
    """Write the figure as PNG to a local path or URI, and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())
    return str(path)


def preview(path: str | Path, image: np.ndarray, windows: Sequence[Window], title: str = "", caption: str = "") -> str:
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
    return _save(fig, path)


def format_probabilities(probabilities: Sequence[float], truth: Sequence[float] | None = None) -> str:
    """'epidural 0.02  ...' with the true label beside each probability when known."""
    parts = []
    for j, name in enumerate(LABELS):
        mark = "" if truth is None else f"({int(truth[j])})"
        parts.append(f"{name[:6]} {probabilities[j]:.2f}{mark}")
    return "  ".join(parts)


def curves(path: str | Path, history, score: str = "val_weighted_log_loss") -> str:
    """Train loss and validation score per epoch (one row of `history` per epoch)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["train_loss"], "o-", label="train loss (weighted BCE)")
    ax.plot(history["epoch"], history[score], "s-", label=f"validation {score.removeprefix('val_')}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted log loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def sweep_plot(path: str | Path, trials, score: str = "val_weighted_log_loss") -> str:
    """Best validation score of each trial against its learning rate, coloured by decay."""
    column = "best_" + score
    done = trials[trials[column].notna()]
    fig, ax = plt.subplots(figsize=(6, 4))
    points = ax.scatter(done["lr"], done[column], c=done["decay"], cmap="viridis", s=60, edgecolors="k")
    for _, row in done[done["stopped_early"]].iterrows():
        ax.annotate("stopped", (row["lr"], row[column]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"best validation {score.removeprefix('val_')}")
    fig.colorbar(points, ax=ax, label="per-epoch lr decay")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def roc_plot(path: str | Path, y_true: np.ndarray, y_pred: np.ndarray) -> str:
    """One ROC curve per label (labels with a single class in y_true are skipped)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for j, name in enumerate(LABELS):
        if 0 < y_true[:, j].sum() < len(y_true):
            fpr, tpr, _ = roc_curve(y_true[:, j], y_pred[:, j])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y_true[:, j], y_pred[:, j]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if ax.get_legend_handles_labels()[0]:  # no label has both classes: nothing to plot, nothing to name
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def calibration_plot(path: str | Path, y_true: np.ndarray, y_pred: np.ndarray, bins: int = 10) -> str:
    """Mean predicted probability vs observed frequency in equal-width bins, per label."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    edges = np.linspace(0, 1, bins + 1)
    for j, name in enumerate(LABELS):
        which = np.clip(np.digitize(y_pred[:, j], edges) - 1, 0, bins - 1)
        used = [b for b in range(bins) if (which == b).any()]
        if y_true[:, j].sum() == 0 or not used:
            continue
        ax.plot([y_pred[which == b, j].mean() for b in used], [y_true[which == b, j].mean() for b in used], "o-",
                ms=3, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed frequency")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
