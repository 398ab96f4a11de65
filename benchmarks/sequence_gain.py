"""What the sequence stage adds on held-out phantom studies, what it costs, and in-fold vs out-of-fold training.

In one run, on one machine, phantom data written here (96 px input, CNN from scratch):

  cnn              raysys.train.fit on --studies training studies: the CNN, best epoch by validation
  sequence         raysys.train_sequence.fit_sequence on the same data and split (the product's path: the GRU
                   trains on the CNN's training-split series, in-fold for the CNN)
  held_out         both stages on --held-out other studies (raysys.predict): weighted log loss and AUC of
                   `any`, and sequence_vs_cnn = the first's loss over the second's (the goal: <= 0.8)
  wall_s           the CNN's fit against the sequence stage's (scan + embeddings + GRU), and their ratio
  fold_comparison  on the same embeddings, in plain torch: GRUs trained on k in-fold training series against
                   GRUs trained on the k validation series (out-of-fold: the CNN never saw them), k = the
                   number of validation series, --draws draws each; held-out loss at the best validation
                   epoch (each scored on the other side's series). Equal series counts isolate what in-fold
                   embeddings cost; the product's choice also weighs that the training split has ~4x the series.

Prints one JSON line to stdout, progress to stderr.

    .venv/bin/python benchmarks/sequence_gain.py [--studies 80] [--held-out 60] [--epochs 6] [--draws 3]
        [--neighbors 0] [--num-cpus N] [--out result.json]

Run it with --neighbors 0 and 1 to see what 2.5D input adds to the CNN, and the sequence stage on top.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import add_ray_flags, emit, init_ray, log, machine


def gru_held_out(train_items, val_items, held_items, s, seed: int) -> float:
    """Held-out weighted log loss of a SeriesGRU trained like the product's loop (best epoch by validation)."""
    import torch

    from raysys.metrics import weighted_log_loss
    from raysys.sequence import SeriesGRU, pad_series, score_series, train_sequence_epoch

    def loss(model, items):
        y = np.concatenate([i["label"] for i in items])
        return weighted_log_loss(y, np.concatenate(score_series(model, items, torch.device("cpu"))))

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    width = train_items[0]["features"].shape[1] if s.features else 0
    def strip(items):
        return [{**i, "features": i["features"][:, :width].astype(np.float32)} for i in items]

    train_items, val_items, held_items = strip(train_items), strip(val_items), strip(held_items)
    model = SeriesGRU(width, s.hidden, s.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    best = (float("inf"), float("nan"))
    for _ in range(s.epochs):
        order = rng.permutation(len(train_items))
        batches = [pad_series([train_items[i] for i in order[j : j + s.batch_size]])
                   for j in range(0, len(order), s.batch_size)]
        train_sequence_epoch(model, batches, optimizer, torch.device("cpu"))
        val = loss(model, val_items)
        if val < best[0]:
            best = (val, loss(model, held_items))
    return best[1]


def held_out_items(checkpoint: str, data: Path, labels: Path, windows, size: int, neighbors: int) -> list[dict]:
    """Series items (features, logits, labels) of the held-out studies under the CNN, in slice order."""
    import pandas as pd

    from raysys import data as rdata
    from raysys.config import InferenceConfig
    from raysys.predict import Embedder, run_model
    from raysys.sequence import series_items

    found = rdata.scan(str(data), str(labels), training=True)
    ds = rdata.image_dataset(found.index, found, windows=windows, size=size, with_labels=False, neighbors=neighbors)
    out = run_model(ds, Embedder, {"checkpoint": checkpoint}, InferenceConfig(), len(found.index), "held-out embeddings")
    row = pd.Series(np.arange(len(out["image_id"])), index=[str(i) for i in out["image_id"]])
    index = found.index.assign(row=row.loc[found.index["image_id"].astype(str)].to_numpy())
    return series_items(rdata.order_series(index), out["features"], out["logits"], labels=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=80, help="training studies (the demo's 80)")
    parser.add_argument("--held-out", type=int, default=60, help="held-out studies")
    parser.add_argument("--epochs", type=int, default=6, help="CNN epochs")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--draws", type=int, default=3, help="draws of the in-fold vs out-of-fold comparison")
    parser.add_argument("--neighbors", type=int, default=0, help="2.5D CNN: slices on each side as extra channels")
    add_ray_flags(parser)
    args = parser.parse_args()

    from raysys.config import Config
    from raysys.model import read_meta
    from raysys.predict import evaluate_predictions, predict_folder
    from raysys.synthetic import RSNA_PREVALENCE, PhantomConfig, write_dataset
    from raysys.train import fit, load_split
    from raysys.train_sequence import embed_split, fit_sequence

    cpus = init_ray(args.address, args.num_cpus, dashboard=True)
    tmp = Path(tempfile.mkdtemp(prefix="sequence-gain-"))
    try:
        prevalence = {name: p * 2.0 for name, p in RSNA_PREVALENCE.items()}  # the demo's
        log(f"writing {args.studies} training and {args.held_out} held-out phantom studies under {tmp}")
        train = write_dataset(tmp / "train", PhantomConfig(studies=args.studies, size=256, seed=1, prevalence=prevalence))
        write_dataset(tmp / "held-out", PhantomConfig(studies=args.held_out, size=256, seed=2, prevalence=prevalence))
        cfg = Config().replace(**{
            "data.data": str(tmp / "train" / "dicoms"), "data.labels": str(tmp / "train" / "labels.csv"),
            "data.image_size": args.image_size, "data.val_fraction": 0.2, "data.neighbors": args.neighbors,
            "model.weights": "none",
            "train.epochs": args.epochs, "train.batch_size": 16, "train.workers": 1, "train.cpus_per_worker": 1.0,
            "train.lr": 2e-3, "train.decay": 0.9, "train.storage_path": str(tmp / "runs"), "train.name": "cnn",
        })
        began = time.perf_counter()
        cnn = fit(cfg)
        cnn_s = time.perf_counter() - began
        log(f"CNN: {cnn_s:.0f}s, best epoch {cnn.best_metrics['epoch']}")
        seq_cfg = cfg.replace(**{"sequence.cnn": cnn.best_checkpoint, "train.name": "sequence"})
        began = time.perf_counter()
        seq = fit_sequence(seq_cfg)
        seq_s = time.perf_counter() - began
        log(f"sequence stage: {seq_s:.0f}s, best epoch {seq.best_metrics['epoch']}")

        preds = predict_folder(seq.best_checkpoint, str(tmp / "held-out" / "dicoms"), progress=False)
        metrics = evaluate_predictions(preds, str(tmp / "held-out" / "labels.csv"), seq.best_checkpoint, str(tmp / "eval"))

        meta = read_meta(cnn.best_checkpoint)
        split = load_split(seq_cfg)
        train_items, val_items = embed_split(seq_cfg, split, meta)
        held = held_out_items(cnn.best_checkpoint, tmp / "held-out" / "dicoms", tmp / "held-out" / "labels.csv",
                              meta["windows"], meta["image_size"], meta["neighbors"])
        k, rng = len(val_items), np.random.default_rng(0)
        in_fold, out_of_fold = [], []
        for draw in range(args.draws):
            subset = [train_items[i] for i in rng.choice(len(train_items), size=min(k, len(train_items)), replace=False)]
            in_fold.append(gru_held_out(subset, val_items, held, seq_cfg.sequence, seed=draw))
            out_of_fold.append(gru_held_out(val_items, subset, held, seq_cfg.sequence, seed=draw))
            log(f"draw {draw}: in-fold {in_fold[-1]:.4f}, out-of-fold {out_of_fold[-1]:.4f} ({k} series each)")
        all_in_fold = gru_held_out(train_items, val_items, held, seq_cfg.sequence, seed=0)

        result = {
            "benchmark": "sequence_gain",
            "machine": machine(),
            "ray_cpus": cpus,
            "setup": {"studies": args.studies, "training_slices": len(train), "held_out_studies": args.held_out,
                      "held_out_slices": metrics["n_images"], "image_size": args.image_size, "cnn_epochs": args.epochs,
                      "neighbors": args.neighbors,
                      "sequence": {k: v for k, v in seq_cfg.to_dict()["sequence"].items() if k != "cnn"}},
            "held_out": {
                "cnn_weighted_log_loss": metrics["cnn"]["weighted_log_loss"],
                "sequence_weighted_log_loss": metrics["weighted_log_loss"],
                "sequence_vs_cnn": metrics["sequence_vs_cnn"],
                "prior_weighted_log_loss": metrics["prior_weighted_log_loss"],
                "cnn_auc_any": metrics["cnn"]["per_class_auc"]["any"],
                "sequence_auc_any": metrics["per_class_auc"]["any"],
            },
            "wall_s": {"cnn_fit": round(cnn_s, 1), "sequence_fit": round(seq_s, 1), "sequence_over_cnn": seq_s / cnn_s},
            "fold_comparison": {
                "series_each": k, "training_series": len(train_items), "draws": args.draws,
                "in_fold_held_out": in_fold, "out_of_fold_held_out": out_of_fold,
                "in_fold_mean": float(np.mean(in_fold)) if in_fold else None,
                "out_of_fold_mean": float(np.mean(out_of_fold)) if out_of_fold else None,
                "all_training_series_held_out": all_in_fold,
                "cnn_held_out": metrics["cnn"]["weighted_log_loss"],
            },
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ~1.2 GB of phantom DICOMs and runs at 200 studies
    emit(result, args.out)


if __name__ == "__main__":
    main()
