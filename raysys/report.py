"""What people look at: PNG figures (slice previews, training curves, sweeps, ROC and calibration) and the
one page, index.html, that gathers a run's facts, metrics and figures beside them."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from urllib.parse import quote

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


# --- a run's report as one page: index.html beside its PNGs ---------------------------------------------------

INDEX = "index.html"
MISSING = "n/a"  # a value the run does not have, e.g. the AUC of a label with one class only
PAGE_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1180px;
       padding: 0 1em; color: #1d2329; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.7em; }
th { background: #f3f5f7; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, monospace; }
table.facts th { font-weight: 500; }
tr.score td, tr.score th { font-weight: 600; }
.note { color: #57606a; font-size: 0.9em; margin-top: 0.3em; }
.figures { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; border: 1px solid #d0d7de; padding: 0.5em; flex: 1 1 540px; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { color: #57606a; font-size: 0.9em; margin-top: 0.3em; }
footer { margin-top: 2.5em; color: #57606a; font-size: 0.85em; }
"""


@dataclass(frozen=True)
class Table:
    """A plain table for the page: one header row, then rows of str / int / float / bool / None cells."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence]
    note: str = ""


def format_metric(value) -> str:
    """A loss or an AUC as the page shows it: 4 decimals; None or NaN (a label with one class only) as n/a."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return MISSING
    return f"{float(value):.4f}"


def format_value(value) -> str:
    """Any other cell: yes/no, integers whole, floats to 4 significant digits, missing as n/a, text as is."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def write_index(
    report_dir: str | Path,
    title: str,
    *,
    facts: dict,
    metrics: dict | None = None,
    metrics_title: str = "Metrics",
    tables: Sequence[Table] = (),
    figures: Sequence[tuple[str, str]] = (),
    files: Sequence[str] = (),
) -> str:
    """Write `report_dir/index.html`, one self-contained page of a run; returns its path.

    facts: {what: value} about the run (command, checkpoint name, data counts); the time the page is written
    is added. metrics: evaluate's shape (`summarize` plus, for a sequence checkpoint, its CNN alone under `cnn`).
    figures: (PNG file name, caption) and files: names of files in `report_dir` to link; both must exist there,
    and the page names them relatively, so the folder opens from disk, moved or zipped, with no server.
    Inline CSS, no script, no external URL; every string from data or config is HTML-escaped.
    """
    for name in [name for name, _ in figures] + list(files):
        if name != Path(name).name or "\\" in name or name.startswith("."):
            raise ValueError(f"report page: {name!r} is not a plain file name in {report_dir}")
        if not storage.is_file(storage.join(str(report_dir), name)):
            raise ValueError(f"report page: {name} is not in {report_dir}; write it before the page")
    written = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    parts = [f"<h1>{escape(title)}</h1>", "<h2>Run</h2>",
             _table_html([], [(k, v) for k, v in {**facts, "page written": written}.items()], "facts", header_column=True)]
    if metrics is not None:
        parts += [f"<h2>{escape(metrics_title)}</h2>", _metrics_html(metrics)]
    for table in tables:
        parts += [f"<h2>{escape(table.title)}</h2>", _table_html(table.columns, table.rows, "data")]
        if table.note:
            parts.append(f'<p class="note">{escape(table.note)}</p>')
    if figures:
        parts.append('<h2>Figures</h2>\n<div class="figures">')
        for name, caption in figures:
            parts.append(f'<figure><a href="{_href(name)}"><img src="{_href(name)}" alt="{escape(caption)}"></a>'
                         f"<figcaption>{escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    if files:
        links = ", ".join(f'<a href="{_href(name)}">{escape(name)}</a>' for name in files)
        parts.append(f'<h2>Files</h2>\n<p>{links}</p>')
    parts.append(f"<footer>raysys, {escape(written)}: every image and link on this page is a file in this folder."
                 "</footer>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{PAGE_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
    path = storage.join(str(report_dir), INDEX)
    storage.write_text(path, page)
    return path


def _href(name: str) -> str:
    return escape(quote(name))


def _cell(value, tag: str = "td", metric: bool = False) -> str:
    text = format_metric(value) if metric else format_value(value)
    number = metric or (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool))
    css = ' class="num"' if number and tag == "td" else ""
    return f"<{tag}{css}>{escape(text)}</{tag}>"


def _table_html(columns: Sequence[str], rows: Sequence[Sequence], css: str, header_column: bool = False) -> str:
    head = "<tr>" + "".join(f"<th>{escape(str(c))}</th>" for c in columns) + "</tr>\n" if columns else ""
    body = "".join("<tr>" + "".join(_cell(v, "th" if header_column and i == 0 else "td") for i, v in enumerate(row))
                   + "</tr>\n" for row in rows)
    return f'<table class="{css}">\n{head}{body}</table>'


def _metrics_html(metrics: dict) -> str:
    """Weighted log loss, prior baseline, then per label: log loss and AUC of each stage side by side, positives."""
    stages = [("with sequence stage", metrics), ("CNN alone", metrics["cnn"])] if "cnn" in metrics else [("", metrics)]
    suffix = [f" ({name})" if name else "" for name, _ in stages]
    positives = metrics.get("positives")
    columns = (["label"] + [f"log loss{s}" for s in suffix] + [f"AUC{s}" for s in suffix]
               + (["positives"] if positives else []))
    blank = '<td class="num"></td>'
    rows = ['<tr class="score"><th>weighted log loss</th>'
            + "".join(_cell(m["weighted_log_loss"], metric=True) for _, m in stages) + blank * (len(columns) - 1 - len(stages))
            + "</tr>"]
    if metrics.get("prior_weighted_log_loss") is not None:
        rows.append("<tr><th>prior baseline</th>" + _cell(metrics["prior_weighted_log_loss"], metric=True)
                    + blank * (len(columns) - 2) + "</tr>")
    for label in LABELS:
        rows.append(f"<tr><th>{escape(label)}</th>"
                    + "".join(_cell(m["per_class_log_loss"].get(label), metric=True) for _, m in stages)
                    + "".join(_cell(m["per_class_auc"].get(label), metric=True) for _, m in stages)
                    + (_cell(positives.get(label)) if positives else "") + "</tr>")
    head = "<tr>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>"
    notes = []
    if metrics.get("n_images") is not None:
        notes.append(f"{metrics['n_images']} images.")
    if metrics.get("sequence_vs_cnn") is not None:
        notes.append(f"Weighted log loss, sequence stage / CNN alone: {metrics['sequence_vs_cnn']:.3f}.")
    if metrics.get("prior_weighted_log_loss") is not None:
        source = metrics.get("prior_source", "training split")
        notes.append(f"Prior baseline: every image given the same label frequencies ({source}).")
    notes.append(f"Lower log loss is better; {MISSING}: a label with one class only in these images has no AUC.")
    return (f'<table class="metrics">\n{head}\n' + "\n".join(rows) + "\n</table>\n"
            f'<p class="note">{escape(" ".join(notes))}</p>')


# --- the page of each command ---------------------------------------------------------------------------------

SPLIT_FILE = "split.csv"  # written by raysys.train.Split.save beside every run
ERRORS_FILE = "errors.csv"  # unreadable files, written by raysys.data.scan beside every run and evaluation


def run_page(result, command: str) -> str:
    """index.html in a finished Ray Train run's directory (`raysys train`, `train-sequence`), beside curves.png:
    the best epoch's validation metrics against its split's prior, and every epoch. `result`: a FitResult."""
    run_dir, best = result.run_dir, result.best_metrics
    split = _read_split(run_dir)
    facts = {"command": f"raysys {command}", "run": _tail(run_dir, 1),
             "best checkpoint": _inside(result.best_checkpoint, run_dir), "best epoch": best.get("epoch"),
             "epochs run": int(result.history["epoch"].max()), **_data_facts(split, run_dir)}
    wanted = {"epoch": "epoch", "lr": "lr", "train_loss": "train loss", "val_weighted_log_loss":
              "validation weighted log loss", "val_auc_any": "validation AUC any", "val_positives":
              "validation images with a bleed", "epoch_seconds": "seconds"}
    columns = [c for c in wanted if c in result.history]
    epochs = Table("Epochs", [wanted[c] for c in columns],
                   list(result.history[columns].itertuples(index=False, name=None)),
                   note="Validation runs on the whole validation side after every epoch; the best epoch's "
                        "checkpoint is kept.")
    return write_index(run_dir, f"raysys {command}: {_tail(run_dir, 1)}", facts=facts,
                       metrics=validation_summary(best, split),
                       metrics_title=f"Validation metrics of the best epoch ({best.get('epoch')})", tables=[epochs],
                       figures=[("curves.png", "Training loss and validation weighted log loss per epoch.")],
                       files=_present(run_dir, "metrics.csv", "config.yaml", SPLIT_FILE, ERRORS_FILE))


def sweep_page(result, stage: str = "cnn") -> str:
    """index.html in a finished sweep's directory (`raysys tune`), beside sweep.png and trials.csv: the best
    trial's validation metrics against its split's prior, and every trial. `result`: a SweepResult."""
    sweep_dir = result.sweep_dir
    best = json.loads(storage.read_text(storage.join(result.best_dir, "metrics.json")))
    split = _read_split(storage.join(sweep_dir, "trials", best["trial"]))
    trials = result.trials
    facts = {"command": "raysys tune" + (f" --stage {stage}" if stage != "cnn" else ""), "sweep": _tail(sweep_dir, 1),
             "trials": len(trials), "stopped early by ASHA": int(trials["stopped_early"].sum()),
             "failed": sum(map(bool, map(_first_line, trials["error"]))), "best trial": best["trial"], "best lr": best["lr"],
             "best decay": best["decay"], "best epoch": best["epoch"],
             "best checkpoint": _inside(result.best_dir, sweep_dir), **_data_facts(split, sweep_dir)}
    return write_index(sweep_dir, f"raysys tune: {_tail(sweep_dir, 1)}", facts=facts,
                       metrics=validation_summary(best["metrics"], split),
                       metrics_title=f"Validation metrics of the best trial ({best['trial']}, epoch {best['epoch']})",
                       tables=[trials_table(trials)],
                       figures=[("sweep.png", "Best validation weighted log loss of each trial against its learning "
                                              "rate, coloured by its per-epoch decay.")],
                       files=_present(sweep_dir, "trials.csv", "config.yaml", ERRORS_FILE))


def evaluate_page(out_dir: str, metrics: dict, checkpoint: str, data: str) -> str:
    """index.html in `raysys evaluate`'s folder, beside metrics.json, roc.png and calibration.png; a sequence
    checkpoint's metrics beside its CNN's alone."""
    facts = {"command": "raysys evaluate", "checkpoint": _tail(checkpoint, 2),
             "model": "sequence stage over its CNN" if "cnn" in metrics else "CNN", "data": _tail(data, 2),
             "images scored": metrics["n_images"], "unreadable files": metrics.get("unreadable_files")}
    return write_index(out_dir, f"raysys evaluate: {_tail(checkpoint, 2)}", facts=facts, metrics=metrics,
                       metrics_title="Metrics on the labelled data", figures=evaluation_figures(),
                       files=_present(out_dir, "metrics.json", ERRORS_FILE))


def evaluation_figures() -> list[tuple[str, str]]:
    """The figures evaluate_predictions writes, with their captions."""
    return [("roc.png", "ROC curve per label (a label with one class only in these images is left out)."),
            ("calibration.png", "Calibration: mean predicted probability against the observed frequency, "
                                "in ten equal-width bins, per label.")]


def trials_table(trials) -> Table:
    """A sweep's trials.csv as a page table, without the checkpoint paths; errors cut to their first line."""
    score = "best_val_weighted_log_loss"
    rows = [(t["trial"], t["lr"], t["decay"], t["epochs_run"], t[score], bool(t["val_degenerate"]),
             bool(t["stopped_early"]), _first_line(t["error"]))
            for t in trials.to_dict("records")]
    return Table("Trials", ["trial", "lr", "decay", "epochs run", "best validation weighted log loss",
                            "no bleed in validation", "stopped early", "error"], rows,
                 note="Best first. ASHA stops a trial early when its score trails the others at a rung.")


def validation_summary(reported: dict, split=None) -> dict:
    """A run's reported validation metrics (val_* keys, as in metrics.csv) in evaluate's shape; with the run's
    split (split.csv), the prior baseline (the training side's label frequencies on the validation side) and
    the positives per label."""
    from raysys.metrics import weighted_log_loss

    out = {"n_images": reported.get("val_images"), "weighted_log_loss": reported["val_weighted_log_loss"],
           "per_class_log_loss": {name: reported.get(f"val_log_loss_{name}") for name in LABELS},
           "per_class_auc": {name: reported.get(f"val_auc_{name}") for name in LABELS}}
    if split is not None:
        train, val = split[split["split"] == "train"], split[split["split"] == "val"]
        y = val[list(LABELS)].to_numpy(np.float64)
        if len(y):
            prior = train[list(LABELS)].to_numpy(np.float64).mean(axis=0)
            out["prior_weighted_log_loss"] = weighted_log_loss(y, np.broadcast_to(prior, y.shape))
            out["prior_source"] = "training split"
            out["positives"] = dict(zip(LABELS, map(int, y.sum(axis=0))))
    return out


def _read_split(run_dir: str):
    """The run's split.csv as a frame, or None when the run has none."""
    import pandas as pd

    path = storage.join(run_dir, SPLIT_FILE)
    if not storage.is_file(path):
        return None
    return pd.read_csv(storage.open_bytes(path), dtype={"image_id": str})


def _data_facts(split, run_dir: str) -> dict:
    facts = {}
    if split is not None:
        for side, name in (("train", "training"), ("val", "validation")):
            part = split[split["split"] == side]
            facts[f"{name} images"] = (f"{len(part)} from {part['patient'].nunique()} patients, "
                                       f"{int(part['any'].sum())} with a bleed")
    errors = storage.join(run_dir, ERRORS_FILE)
    if storage.is_file(errors):
        facts["unreadable files"] = max(0, len(storage.read_text(errors).strip().splitlines()) - 1)
    return facts


def _first_line(error) -> str:
    """A trial's error as one short line ("" for none; trials.csv read back gives NaN for none)."""
    text = "" if error is None or (isinstance(error, float) and math.isnan(error)) else str(error).strip()
    return text.split("\n")[0][:160]


def _present(folder: str, *names: str) -> list[str]:
    return [name for name in names if storage.is_file(storage.join(folder, name))]


def _tail(path: str, parts: int) -> str:
    """The last `parts` components of a path or URI: a name that says which run, without the machine's folders."""
    return "/".join(str(path).rstrip("/").split("/")[-parts:])


def _inside(path: str, base: str) -> str:
    """`path` relative to `base` when it lies inside it, else its last two components."""
    prefix = str(base).rstrip("/") + "/"
    return str(path)[len(prefix):] if str(path).startswith(prefix) else _tail(path, 2)
