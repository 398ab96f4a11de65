"""Experiment tracking: a TensorBoard event file in every run folder, one point per epoch.

`tensorboard --logdir runs/` (or a sweep's folder) shows every run and every trial of a sweep side by side:
each Train run, CNN or sequence stage, writes `<run>/tensorboard/` from its rank-0 worker after each epoch's
report. On a local or shared (NFS) path the file is written in place and TensorBoard sees each epoch as it
ends; on object storage (s3://, gs://) it is written on the worker's disk and copied up after each epoch.
A resumed run appends a new event file; its epochs continue where the checkpoint left off.

Scalars (step = epoch): loss/train, loss/val (the weighted log loss), lr, speed/images_per_s_per_worker,
val_log_loss/<label>, val_auc/<label> (AUC is absent while a label has no positive in validation).
"""

from __future__ import annotations

import math
import tempfile
import time
import uuid
from pathlib import Path

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

    Events are written synchronously (tensorboardX's SummaryWriter queues them for a thread, and a worker that
    fails right after an epoch would lose that epoch's points)."""

    def __init__(self, run_dir: str):
        from tensorboardX.event_file_writer import EventsWriter

        self._remote = storage.join(run_dir, TENSORBOARD_DIR) if storage.is_uri(run_dir) else None
        if self._remote:
            self._scratch = tempfile.TemporaryDirectory(prefix="raysys-tensorboard-")
            self._local = Path(self._scratch.name)
        else:
            self._local = Path(run_dir) / TENSORBOARD_DIR
        self._local.mkdir(parents=True, exist_ok=True)
        # A unique suffix: two attempts of a run started within one second would otherwise share a file name.
        self._writer = EventsWriter(str(self._local / "events"), filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def write(self, metrics: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        step, now = int(metrics["epoch"]), time.time()
        for key, tag in TAGS.items():
            value = metrics.get(key)
            if value is not None and math.isfinite(float(value)):
                self._writer.write_event(Event(wall_time=now, step=step, summary=scalar(tag, float(value))))
        self._writer.flush()
        if self._remote:
            for path in self._local.iterdir():
                storage.write_bytes(storage.join(self._remote, path.name), path.read_bytes())

    def close(self) -> None:
        self._writer.close()
        if self._remote:
            self._scratch.cleanup()
