"""Experiment tracking: a TensorBoard event file in every run folder, one point per epoch.

`tensorboard --logdir runs/` (or a sweep's folder) shows every run and every trial of a sweep side by side:
each Train run, CNN or sequence stage, writes `<run>/tensorboard/` from its rank-0 worker after each epoch's
report. On a local or shared (NFS) path the file is written in place and TensorBoard sees each epoch as it
ends; on object storage (s3://, gs://) the whole file is put again after each epoch (a few KB).
A resumed run appends a new event file; its epochs continue where the checkpoint left off.

Scalars (step = epoch): loss/train, loss/val (the weighted log loss), lr, speed/images_per_s_per_worker,
val_log_loss/<label>, val_auc/<label> (AUC is absent while a label has no positive in validation).
"""

from __future__ import annotations

import math
import socket
import struct
import time
import uuid

from raysys import storage
from raysys.labels import LABELS

TENSORBOARD_DIR = "tensorboard"

# metrics key -> TensorBoard tag
TAGS = {
    "train_loss": "loss/train",
    "val_weighted_log_loss": "loss/val",
    "lr": "lr",
    "train_images_per_s": "speed/images_per_s_per_worker",
    **{f"val_log_loss_{name}": f"val_log_loss/{name}" for name in LABELS},
    **{f"val_auc_{name}": f"val_auc/{name}" for name in LABELS},
}


class EpochLog:
    """The event file of one run; `write(metrics)` after each epoch, `close()` at the end (rank 0 only).

    The file is TensorBoard's record format, built here and written at once after each epoch: appended in place
    on a local or shared path, the whole file put again on object storage. Nothing is queued for a thread (a worker
    that fails right after an epoch would lose that epoch's points) and nothing is kept on the worker's disk (a
    trial that Tune ends is killed before it could remove a scratch copy)."""

    def __init__(self, run_dir: str):
        from tensorboardX.proto.event_pb2 import Event

        folder = storage.join(run_dir, TENSORBOARD_DIR)
        storage.make_dirs(folder)
        # A unique suffix: two attempts of a run started within one second would otherwise share a file name.
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{uuid.uuid4().hex[:8]}"
        self._path, self._remote = storage.join(folder, name), storage.is_uri(run_dir)
        self._records = _record(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self._flush(self._records)

    def write(self, metrics: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        step, now = int(metrics["epoch"]), time.time()
        new = b"".join(_record(Event(wall_time=now, step=step, summary=scalar(tag, float(value))).SerializeToString())
                       for key, tag in TAGS.items()
                       if (value := metrics.get(key)) is not None and math.isfinite(float(value)))
        self._records += new
        self._flush(new)

    def _flush(self, new: bytes) -> None:
        if self._remote:
            storage.write_bytes(self._path, self._records)
        else:
            with open(self._path, "ab") as f:
                f.write(new)

    def close(self) -> None:
        """Every epoch is written when it is logged; kept so a run's end reads as one."""


def _record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, the data's masked CRC32C (TensorBoard's event file)."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


# --- MLflow (optional: pip install 'raysys[mlflow]') -------------------------------------------------------------

RUN_DIR_TAG = "raysys.run_dir"  # finds a run's MLflow run again when it is relaunched or resumed
RECIPE_SECTIONS = ("data", "augment", "model", "train", "sequence")
RUN_ID_ENV = "MLFLOW_RUN_ID"  # mlflow.start_run() continues this run (how workers join the driver's run)


def mlflow_module(uri: str = ""):
    """The mlflow module (a clear message when the extra is missing). For a folder (MLflow's file store, which
    MLflow 3 refuses unless asked), MLFLOW_ALLOW_FILE_STORE is set: the user asked for exactly that."""
    import os

    from raysys.config import InputError

    if uri and ("://" not in uri or uri.startswith("file://")):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        import mlflow
    except ImportError:
        raise InputError("--mlflow-uri needs MLflow: pip install 'raysys[mlflow]'") from None
    return mlflow


def recipe_params(cfg) -> dict[str, str]:
    """The run's recipe as MLflow params: every config value of the training sections, `section.key` -> text."""
    params = {}
    for section, values in cfg.to_dict().items():
        if section in RECIPE_SECTIONS:
            params.update({f"{section}.{key}": str(value) for key, value in values.items()})
    return params


def mlflow_run(cfg, run_dir: str) -> str | None:
    """On the driver, before training: the MLflow run of this raysys run (created with the recipe as params, or found
    again by its run folder when the run is relaunched), or None without train.mlflow_uri."""
    t = cfg.train
    if not t.mlflow_uri:
        return None
    mlflow = mlflow_module(t.mlflow_uri)
    client = mlflow.MlflowClient(tracking_uri=t.mlflow_uri)
    experiment = client.get_experiment_by_name(t.mlflow_experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(t.mlflow_experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=t.name, tags={RUN_DIR_TAG: run_dir})
    params = [mlflow.entities.Param(k, v) for k, v in recipe_params(cfg).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    return run.info.run_id


def worker_mlflow(cfg, run_id: str | None):
    """In a Train worker: Ray's setup_mlflow joined to the driver's run (rank 0 logs, the others get a no-op
    module), or None when the run is not tracked."""
    if run_id is None:
        return None
    import os

    from ray.air.integrations.mlflow import setup_mlflow

    os.environ[RUN_ID_ENV] = run_id
    mlflow_module(cfg.train.mlflow_uri)
    return setup_mlflow(tracking_uri=cfg.train.mlflow_uri, experiment_name=cfg.train.mlflow_experiment)


def log_epoch(mlflow, metrics: dict) -> None:
    """One epoch's numbers (the TensorBoard scalars, under their metrics names) at step = epoch."""
    if mlflow is None:
        return
    values = {key: float(metrics[key]) for key in TAGS if metrics.get(key) is not None and math.isfinite(float(metrics[key]))}
    mlflow.log_metrics(values, step=int(metrics["epoch"]))


def finish_mlflow(cfg, run_id: str | None, best_checkpoint: str) -> None:
    """On the driver, after training: the best checkpoint as the run's artifact `best_checkpoint/`, run ended."""
    if run_id is None:
        return
    from raysys import storage

    client = mlflow_module(cfg.train.mlflow_uri).MlflowClient(tracking_uri=cfg.train.mlflow_uri)
    client.log_artifacts(run_id, str(storage.local_dir(best_checkpoint)), artifact_path="best_checkpoint")
    client.set_terminated(run_id)
