"""Ray Train on a real local Ray: 2 CPU workers (gloo), tiny phantom data, checkpoints and resume."""


from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_cli import mlflow_client

from raysys import data as rdata
from raysys.config import Config, InputError
from raysys.engine import score_batches
from raysys.labels import LABELS
from raysys.metrics import weighted_log_loss
from raysys.model import load_checkpoint
from raysys.testing import small_phantom
from raysys.train import FAIL_ENV, SCORE, fit

SIZE = 80


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-phantom")
    small_phantom(out, seed=5)
    return out


def _cfg(phantom, tmp_path, epochs):
    return Config().replace(**{
        "data.data": str(phantom / "dicoms"), "data.labels": str(phantom / "labels.csv"),
        "data.image_size": SIZE, "data.val_fraction": 0.3, "data.seed": 1,
        "model.weights": "none",
        "train.epochs": epochs, "train.batch_size": 4, "train.workers": 2, "train.lr": 1e-3, "train.decay": 0.5,
        "train.storage_path": str(tmp_path / "runs"), "train.name": "t", "train.max_steps_per_epoch": 3,
        "train.max_failures": 1, "train.mlflow_uri": str(tmp_path / "mlruns"), "train.mlflow_experiment": "fit",
        "train.pin_memory": True,  # CUDA only: a CPU run must ignore it (pinning needs a GPU)
    })


def test_fit_checkpoints_resumes_after_failure_and_on_relaunch(ray_session, phantom, tmp_path, monkeypatch):
    marker = tmp_path / "failed-once"
    monkeypatch.setenv(FAIL_ENV, f"1:{marker}")
    result = fit(_cfg(phantom, tmp_path, epochs=2))
    assert marker.exists()  # the injected failure really happened after epoch 1
    history = result.history
    assert list(history["epoch"]) == [1, 2]
    assert list(history["start_epoch"]) == [1, 2]  # the restarted group began at epoch 2, not 0
    assert np.allclose(history["lr"], 1e-3 * 0.5 ** (history["epoch"] - 1))  # lr x decay^epoch
    assert history[SCORE].notna().all() and (history["train_images"] > 0).all()
    # Each worker's torch threads: Ray sets OMP_NUM_THREADS from the worker's CPUs, at least 1.
    assert (history["torch_threads"] == max(1, int(Config().train.cpus_per_worker))).all()
    run_dir = Path(result.run_dir)
    for name in ("metrics.csv", "curves.png", "config.yaml", "errors.csv", "split.csv"):
        assert (run_dir / name).is_file(), name
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 2

    # The best checkpoint is the lowest reported score, and it reproduces that score on the val split.
    assert result.best_metrics[SCORE] == pytest.approx(history[SCORE].min())
    ck = load_checkpoint(result.best_checkpoint)
    split = pd.read_csv(run_dir / "split.csv")
    found = rdata.scan(str(phantom / "dicoms"), str(phantom / "labels.csv"))
    # Patients numbered within the run, never their DICOM PatientID: split.csv holds none of them.
    text = (run_dir / "split.csv").read_text()
    assert "patient_id" not in split and not [p for p in found.index["patient_id"].unique() if p in text]
    patients = found.index.loc[split["image_id"], "patient_id"].to_numpy()
    assert (pd.crosstab(split["patient"].to_numpy(), patients) > 0).sum(axis=1).eq(1).all()  # one number, one patient
    assert split["patient"].nunique() == len(set(patients))
    val = found.index.loc[split.loc[split["split"] == "val", "image_id"]]
    rows = rdata.image_dataset(val, found, size=SIZE).take_all()
    batches = [{"image": torch.as_tensor(np.stack([r["image"] for r in rows])),
                "label": torch.as_tensor(np.stack([r["label"] for r in rows]))}]
    out = score_batches(ck.model, batches, torch.device("cpu"))
    assert weighted_log_loss(out["labels"], out["probabilities"]) == pytest.approx(result.best_metrics[SCORE], abs=1e-4)
    assert ck.meta["labels"] == list(LABELS) and ck.meta["image_size"] == SIZE

    # Relaunching with the same name and more epochs continues from the latest checkpoint, here with a compiled
    # training step (torch.compile's aot_eager backend; see tests/test_compile.py) on the two DDP workers: whole
    # batches only, and still a checkpoint of the plain model.
    monkeypatch.delenv(FAIL_ENV)
    batch = 5  # each worker's share of this phantom's balanced epoch (12) leaves a partial batch of 2
    again = fit(_cfg(phantom, tmp_path, epochs=3).replace(**{"train.compile": "aot_eager", "train.batch_size": batch,
                                                             "train.max_steps_per_epoch": 0}))
    assert list(again.history["epoch"]) == [1, 2, 3]
    assert again.history["start_epoch"].iloc[-1] == 3
    share = len(rdata.balance(split.query("split == 'train'"), epoch=3, seed=1)) // 2  # as Ray Train splits it
    assert share % batch > 1 and again.history["train_images"].iloc[-1] == share // batch * batch
    assert again.history["first_step_seconds"].iloc[-1] > 0
    assert load_checkpoint(again.best_checkpoint).meta["image_size"] == SIZE  # a strict load: no compile prefix

    # A relaunch that changes what the checkpoint restores (the optimizer's lr) or the split is refused, naming the
    # changes, before anything runs; batch size, compile and step caps (changed above) may change.
    with pytest.raises(InputError, match=r"data.seed 1 -> 2; train.lr 0.001 -> 0.002") as refused:
        fit(_cfg(phantom, tmp_path, epochs=4).replace(**{"train.lr": 2e-3, "data.seed": 2}))
    assert str(run_dir) in str(refused.value) and "--name" in str(refused.value)

    # TensorBoard, read back by TensorBoard's own reader: one point per epoch across the failure and the relaunch,
    # equal to metrics.csv.
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    csv = pd.read_csv(run_dir / "metrics.csv")
    for tag, column in (("loss/val", SCORE), ("loss/train", "train_loss"), ("lr", "lr"),
                        ("val_log_loss/any", "val_log_loss_any")):
        steps = sorted(scalars[tag])
        assert steps == [1, 2, 3], tag
        assert [scalars[tag][k] for k in steps] == pytest.approx(list(csv[column]), rel=1e-6), tag

    # MLflow, read back with MLflow's client: one run across the failure and the relaunch, the recipe as params,
    # each epoch once, the best checkpoint as its artifact.
    client = mlflow_client(tmp_path / "mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("fit").experiment_id])
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.decay"] == "0.5"
    assert run.data.params["data.image_size"] == str(SIZE) and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, SCORE)
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(list(csv[SCORE]), rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")}
    assert {"best_checkpoint/model.pt", "best_checkpoint/meta.json"} <= artifacts


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event file in `folder` (a later file's point wins, as in TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return out

