"""Ray Train: data-parallel InceptionV3 (TorchTrainer, Train V2), checkpoints, resume; fit(cfg)."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
import yaml
from ray.train.torch import TorchTrainer

from raysys import data as rdata
from raysys import storage
from raysys.config import CONFIG_FILE, Config, InputError, from_dict, save_config
from raysys.device_augment import DeviceAugment
from raysys.engine import WeightedBCE, compile_step, train_one_epoch, use_amp, validate
from raysys.labels import LABELS
from raysys.model import build_model, load_backbone, read_meta, read_state, save_checkpoint, unwrap
from raysys.runtime import cpus_left
from raysys.tracking import EpochLog, finish_mlflow, log_epoch, mlflow_run, worker_mlflow

log = logging.getLogger(__name__)

SCORE = "val_weighted_log_loss"  # checkpoints and Tune rank by it; lower is better
FAIL_ENV = "RAYSYS_TEST_FAIL_AFTER_EPOCH"  # test-only: kill the worker group once after this epoch
VAL_COLUMNS = ["image", "label"]
DTYPES = {"image": torch.uint8, "label": torch.float32, "aug_seed": torch.int64}


def train_columns(cfg: Config) -> list[str]:
    """What a training batch carries: each image's augmentation seed too when the device augments."""
    return VAL_COLUMNS + (["aug_seed"] if cfg.augment.on == "device" else [])


@dataclass(frozen=True)
class FitResult:
    run_dir: str  # <storage_path>/<name>: checkpoints, metrics.csv, curves.png, config.yaml, split.csv, errors.csv
    best_checkpoint: str  # directory of the checkpoint with the lowest validation score
    best_metrics: dict
    history: pd.DataFrame  # one row per epoch


def run_dir_for(cfg: Config) -> str:
    """A run's folder: `<storage_path>/<name>`, beside Ray Train's checkpoints (local path or URI)."""
    return storage.join(cfg.train.storage_path, cfg.train.name)


@dataclass(frozen=True)
class Split:
    """The scanned data and its patient split: computed once, shared by every trial of a sweep."""

    source: rdata.Scan
    train: pd.DataFrame
    val: pd.DataFrame

    @property
    def degenerate(self) -> bool:
        """No bleed on the validation side: the score then ranks only how well negatives are recognised."""
        return rdata.degenerate_validation(self.val)

    def save(self, run_dir: str) -> None:
        """split.csv (image, patient, side, labels) and errors.csv in the run directory.

        `patient` numbers the patients 1, 2, ... within this run: which images share one, never the DICOM PatientID
        (runs and their folders get copied and shared)."""
        frame = pd.concat([self.train.assign(split="train"), self.val.assign(split="val")])
        frame = frame.assign(patient=pd.factorize(frame["patient_id"])[0] + 1)
        storage.write_text(storage.join(run_dir, "split.csv"),
                           frame[["image_id", "patient", "split", *LABELS]].to_csv(index=False))
        storage.write_text(storage.join(run_dir, "errors.csv"), self.source.errors.to_csv(index=False))


def load_split(cfg: Config, run_dir: str | None = None) -> Split:
    """Scan the data (errors.csv, max_error_fraction gate) and split it by patient."""
    d = cfg.data
    if not d.labels:
        raise ValueError("training needs --labels (the RSNA ID,Label CSV)")
    found = rdata.scan(d.data, d.labels, training=True, max_error_fraction=d.max_error_fraction,
                       run_dir=run_dir, decode_cpus=d.decode_cpus)
    train, val = rdata.split_by_patient(found.index, val_fraction=d.val_fraction, seed=d.seed, folds=d.folds,
                                        fold=d.fold)
    if train["any"].sum() == 0 or len(val) == 0:
        raise rdata.DataError(f"{d.data}: the split left no positive training images or no validation images")
    split = Split(found, train, val)
    log.info("data: %d images, %d train / %d validation (patient split; %d with a bleed), %d unreadable files",
             len(found.index), len(train), len(val), int(val["any"].sum()), len(found.errors))
    if split.degenerate:
        log.warning("the validation side has no image with a bleed (too few patients with one for this split): "
                    "%s then ranks checkpoints and trials only by how well negatives are recognised; "
                    "metrics.csv and trials.csv mark it val_degenerate = 1", SCORE)
    return split


# What a relaunch under the same name (it resumes the run) cannot change: the split, which must stay the one the
# restored model was validated on, the model's input, and the optimizer's recipe, which the checkpoint restores.
SPLIT_FIELDS = ("val_fraction", "folds", "fold", "seed")  # the data fields that decide which patients validate
SPLIT_KEYS = tuple(f"data.{name}" for name in SPLIT_FIELDS)
FIXED_ON_RESUME = (*SPLIT_KEYS, "data.windows", "data.image_size", "data.neighbors", "model.aux_logits", "train.lr",
                   "train.decay")


def check_relaunch(cfg: Config, keys: tuple[str, ...] = FIXED_ON_RESUME) -> None:
    """Refuse to resume a run under a recipe it was not started with, naming each change, instead of silently
    training on with the old optimizer and a new split. A run with no checkpoint yet starts afresh: no check."""
    run_dir = run_dir_for(cfg)
    path = storage.join(run_dir, CONFIG_FILE)
    if not storage.is_file(path) or not any(f.startswith("checkpoint_") for f in storage.folder_files(run_dir)):
        return
    before = yaml.safe_load(storage.read_text(path)) or {}  # as written: an older version's keys need not load
    now = cfg.to_dict()
    changed = [f"{key} {before[section][name]!r} -> {now[section][name]!r}" for key in keys
               for section, name in [key.split(".")]
               if name in before.get(section, {}) and before[section][name] != now[section][name]]
    if changed:
        raise InputError(f"{run_dir}: a run of this name exists and a relaunch resumes it, but this launch changes its "
                         f"recipe ({'; '.join(changed)}); its checkpoint would keep the old one. Give a new --name "
                         "for a new run, or relaunch with the run's own config.yaml.")


def put_backbone(cfg: Config) -> ray.ObjectRef | None:
    """Resolve and check the starting weights on the driver, once, and hand them to workers by the object store.

    Bad weights (offline ImageNet download, a missing or foreign file) fail here in seconds, before any data
    is scanned or worker started, instead of in a worker group that FailureConfig would retry.
    """
    backbone = load_backbone(cfg.model.weights)
    return None if backbone is None else ray.put(backbone)


def fit(cfg: Config, callbacks: list | None = None) -> FitResult:
    """Resolve the weights, scan and split the data, then train with TorchTrainer; the same name resumes."""
    check_relaunch(cfg)
    backbone = put_backbone(cfg)
    split = load_split(cfg, run_dir_for(cfg))
    return fit_split(cfg, split, backbone, callbacks)


def fit_split(cfg: Config, split: Split, backbone: ray.ObjectRef | None, callbacks: list | None = None) -> FitResult:
    """Train on an already scanned split with already resolved weights (a sweep's trials share both)."""
    run_dir = run_dir_for(cfg)
    save_config(cfg, run_dir)
    split.save(run_dir)
    tracked = mlflow_run(cfg, run_dir)
    result = finish(run_dir, build_trainer(cfg, split, callbacks, backbone, tracked).fit())
    finish_mlflow(cfg, tracked, result.best_checkpoint)
    return result


def build_datasets(cfg: Config, split: Split) -> dict:
    """{"val": ..., "train_1": ..., "train_E": ...}: one lazy dataset per epoch, balanced with (seed, epoch).

    Nothing is decoded here; each epoch's dataset streams when its workers iterate it.
    """
    d = cfg.data
    kwargs = {"windows": d.windows, "size": d.image_size, "decode_cpus": d.decode_cpus, "neighbors": d.neighbors}
    fractional = {"num_cpus": d.decode_cpus}  # every op fractional, or 2 cores starve
    datasets = {"val": rdata.image_dataset(split.val, split.source, **kwargs).select_columns(VAL_COLUMNS, **fractional)}
    for epoch in range(1, cfg.train.epochs + 1):
        rows = rdata.balance(split.train, epoch=epoch, seed=d.seed, neg_ratio=d.neg_ratio)
        ds = rdata.image_dataset(rows, split.source, **kwargs)
        ds = rdata.augment_dataset(ds, cfg.augment, seed=d.seed, epoch=epoch, decode_cpus=d.decode_cpus)
        datasets[f"train_{epoch}"] = ds.select_columns(train_columns(cfg), **fractional)
    return datasets


def build_trainer(cfg: Config, split: Split, callbacks: list | None = None,
                  backbone: ray.ObjectRef | None = None, mlflow_run_id: str | None = None) -> TorchTrainer:
    t = cfg.train
    datasets = build_datasets(cfg, split)
    use_gpu = t.gpus_per_worker > 0
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if use_gpu else {})}
    cpus_left(t.workers * t.cpus_per_worker, cfg.data.decode_cpus, f"training ({t.workers} workers)")
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "backbone": backbone,
            "mlflow_run_id": mlflow_run_id,
            "logit_offset": rdata.balance_logit_offset(split.train, cfg.data.neg_ratio).tolist(),
            "label_prior": split.train[list(LABELS)].mean().tolist(),  # fills images predict cannot read
            "fail": os.environ.get(FAIL_ENV, ""),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=t.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=t.name,
            storage_path=t.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="min"
            ),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks,
            # Ray Train's own INFO lines (worker group start, each checkpoint) stay in its log files: the run's
            # log has one line per epoch from rank 0.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        # Every worker trains on its own part of each epoch; validation is read whole by rank 0.
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in datasets if k.startswith("train_")]),
    )


# --- the worker loop (glue only: the work is in engine.py) ----------------------------------


def train_loop(config: dict) -> None:
    # Train V2 sets a worker's root logger to INFO, and logs each report there: rank 0 prints one line per epoch.
    logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(config["cfg"])
    t, rank = cfg.train, ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    backbone = ray.get(config["backbone"]) if config["backbone"] is not None else None
    torch.manual_seed(cfg.data.seed)  # the new head's initial weights (with --weights none, the whole network's)
    model = build_model(backbone, image_size=cfg.data.image_size, aux_logits=cfg.model.aux_logits,
                        neighbors=cfg.data.neighbors)
    model.logit_offset.copy_(torch.tensor(config["logit_offset"]))
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))  # as in raysys.engine
    # Only the training step is compiled; validation, checkpoints and resume use the plain module (unwrap).
    step_model = compile_step(model, t.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=t.decay)  # lr x decay^epoch
    start, history = _resume(model, optimizer, scheduler)
    first = start  # where this attempt of the worker group began (> 1 after a resume)
    amp, loss_fn = use_amp(t.amp, device, t.batch_size), WeightedBCE().to(device)  # the training step's precision only
    augment = DeviceAugment(cfg.augment, cfg.data.image_size, device) if cfg.augment.on == "device" else None
    tag = f"[train {t.name}]"
    if rank == 0 and start > 1:
        print(f"{tag} resuming at epoch {start} of {t.epochs}", flush=True)
    epoch_seconds = []
    board = EpochLog(run_dir_for(cfg)) if rank == 0 else None
    mlflow = worker_mlflow(cfg, config.get("mlflow_run_id"))
    for epoch in range(start, t.epochs + 1):
        began, lr = time.perf_counter(), scheduler.get_last_lr()[0]
        torch.manual_seed(epoch_seed(cfg.data.seed, epoch, rank))  # dropout: the same epoch whether resumed or not
        batches = _shard(f"train_{epoch}", cfg, device)
        if epoch < t.epochs:
            # Train V2 starts a split dataset's coordinator (an actor process) when the workers first ask for it:
            # ~2.9 s before each epoch's first batch on 2 cores. Asked for now, it starts while this epoch trains;
            # it holds no CPU and runs nothing until iterated. (Running the next epoch's pipeline early, from a
            # thread holding its first batches, deadlocked two concurrent 2-core trials: its tasks kept the CPUs
            # the running epochs needed. Per-rank datasets streamed in the worker's own process made the demo's
            # two concurrent trials 50% slower.)
            ray.train.get_dataset_shard(f"train_{epoch + 1}")
        stats = train_one_epoch(step_model, batches, optimizer, loss_fn, device, amp=amp,
                                augment=augment, aux_weight=cfg.model.aux_weight, max_steps=t.max_steps_per_epoch)
        scheduler.step()
        stats["train_loss"] = _mean_across_workers(stats["train_loss"], device)
        # The plain module on rank 0 alone: no DDP collectives.
        val = validate(unwrap(model), _shard("val", cfg, device), device) if rank == 0 else None
        val = _broadcast(val)
        epoch_seconds.append(time.perf_counter() - began)
        metrics = {"epoch": epoch, "lr": lr, "start_epoch": first, **stats, **_flatten(val),
                   "epoch_seconds": epoch_seconds[-1], "torch_threads": torch.get_num_threads()}
        history.append(metrics)
        if rank == 0:
            saving = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, config=cfg.to_dict(), epoch=epoch, metrics={**metrics, "history": history},
                                optimizer=optimizer, scheduler=scheduler,
                                extra_meta={"label_prior": config["label_prior"]})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            eta = (t.epochs - epoch) * sum(epoch_seconds) / len(epoch_seconds)
            flag = ("  (diverged: the model's outputs are not finite)" if metrics["val_diverged"] else
                    "  (no bleed in validation)" if metrics["val_degenerate"] else "")
            print(f"{tag} epoch {epoch}/{t.epochs}  lr {lr:.2e}  train_loss {stats['train_loss']:.4f}  "
                  f"{SCORE} {metrics[SCORE]:.4f}{flag}  {stats['train_images_per_s']:.1f} img/s/worker  "
                  f"epoch {epoch_seconds[-1]:.0f}s  checkpoint {time.perf_counter() - saving:.1f}s  ETA {eta:.0f}s",
                  flush=True)
            if t.compile != "off" and epoch == first:
                later = (stats["train_seconds"] - stats["first_batch_seconds"] - stats["first_step_seconds"]) / max(
                    stats["train_steps"] - 1, 1)
                print(f"{tag} torch.compile ({t.compile}): first step {stats['first_step_seconds']:.1f}s "
                      f"(compiling), later steps {later:.2f}s", flush=True)
            board.write(metrics)
            log_epoch(mlflow, metrics)
        else:
            ray.train.report(metrics)
        _maybe_fail(config["fail"], epoch, rank)
    if board is not None:
        board.close()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's seed for one worker's epoch: reproducible runs, and a resumed epoch draws what it would have."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _resume(model, optimizer, scheduler, read=read_state) -> tuple[int, list]:
    """(first epoch to run, history so far) from Ray Train's latest checkpoint, or (1, []).

    read: the checkpoint directory -> its state dict (model, optimizer, scheduler, epoch)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 1, []
    with checkpoint.as_directory() as d:
        state, meta = read(d), read_meta(d)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1, restored_history(meta["metrics"].get("history", []))


def restored_history(history: list[dict]) -> list[dict]:
    """A checkpoint's epoch records as they were written. Checkpoints from before diverged epochs scored
    WORST_LOG_LOSS hold their infinite score as null (strict JSON), which no comparison accepts: read it as inf."""
    return [{**h, SCORE: math.inf if h.get(SCORE) is None else h[SCORE]} for h in history]


def _shard(name: str, cfg: Config, device):
    """This worker's batches of the dataset `name`, on its device. A compiled training step drops an epoch's
    partial last batch: its shape would compile the step again (at most batch_size - 1 of the epoch's sample).

    Ray copies the batches to the device in its prefetch thread, except where the device augments: there the
    batches stay on the host and the training step copies the images, because the augmentation's seeds are read
    on the host, and reading them from a GPU would make the host wait for the step before. With pin_memory the
    step's copy does not wait either (a copy from pageable memory waits for the device's queue to drain)."""
    training = name != "val"
    columns = train_columns(cfg) if training else VAL_COLUMNS
    on_host = training and cfg.augment.on == "device"
    return ray.train.get_dataset_shard(name).iter_torch_batches(
        batch_size=cfg.train.batch_size, dtypes={c: DTYPES[c] for c in columns},
        device="cpu" if on_host else device, prefetch_batches=2, drop_last=training and cfg.train.compile != "off",
        pin_memory=cfg.train.pin_memory and device.type == "cuda")


def _flatten(val: dict) -> dict:
    out = {k: v for k, v in val.items() if not isinstance(v, dict)}
    for name in LABELS:
        out[f"val_log_loss_{name}"] = val["val_per_class_log_loss"][name]
        out[f"val_auc_{name}"] = val["val_per_class_auc"][name]
    return out


def _mean_across_workers(value: float, device) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item() / torch.distributed.get_world_size())


def _broadcast(obj):
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _maybe_fail(spec: str, epoch: int, rank: int) -> None:
    """Test-only failure injection: `RAYSYS_TEST_FAIL_AFTER_EPOCH=N:/path/marker` in the driver's
    environment fails the worker group once, after epoch N's checkpoint."""
    if not spec or rank != 0:
        return
    after, _, marker = spec.partition(":")
    if epoch == int(after) and not os.path.exists(marker):
        Path(marker).write_text(str(epoch))
        raise RuntimeError(f"injected failure after epoch {epoch} ({FAIL_ENV})")


# --- after fit: reports on the driver --------------------------------------------------------


def finish(run_dir: str, result) -> FitResult:
    """metrics.csv and curves.png from the latest checkpoint's history; the best checkpoint's path."""
    from raysys.report import curves

    if result.error:
        raise result.error
    ranked = sorted(result.best_checkpoints, key=lambda cm: cm[1][SCORE])
    best, best_metrics = ranked[0]
    with result.checkpoint.as_directory() as d:
        history = pd.DataFrame(read_meta(d)["metrics"]["history"])
    storage.write_text(storage.join(run_dir, "metrics.csv"), history.to_csv(index=False))
    curves(storage.join(run_dir, "curves.png"), history, score=SCORE)
    return FitResult(run_dir=run_dir, best_checkpoint=storage.with_scheme(best.path, run_dir), best_metrics=best_metrics,
                     history=history)
