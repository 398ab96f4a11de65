"""The `raysys` CLI as a user runs it: its own process (joined to the session's Ray), relative paths from
another working directory, captured logs read line by line, and bad weights failing fast on the driver."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raysys.config import Config
from raysys.labels import LABELS, write_labels
from raysys.testing import small_phantom, strict_json

RAYSYS = str(Path(sys.executable).parent / "raysys")
ESCAPES = re.compile(r"\x1b\[|\r")


TINY = ["--val-fraction", "0.4", "--image-size", "80", "--batch-size", "4", "--weights", "none", "--max-steps-per-epoch", "2"]


@pytest.fixture(scope="module")
def one_bleeding_patient(tmp_path_factory):
    """Phantom studies relabelled so that only one patient has a bleed: its validation side cannot have one."""
    root = tmp_path_factory.mktemp("cli")
    frame = small_phantom(root / "data", studies=6, seed=11)
    keep = frame["patient_id"] == frame["patient_id"].iloc[0]
    labels = frame[list(LABELS)].where(keep, 0)
    labels.loc[keep & (labels["any"] == 0), ["subdural", "any"]] = 1  # every slice of that patient bleeds
    write_labels(root / "data" / "labels.csv", labels)
    return root


def _run(args, cwd, ray_session, timeout=300, env=None):
    """`raysys ARGS` in its own process, joined to the test session's Ray; stdout and stderr captured together."""
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "token", **(env or {})}
    start = time.perf_counter()
    done = subprocess.run([RAYSYS, *args, "--address", address], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return done.returncode, done.stdout, time.perf_counter() - start


def test_train_log_is_plain_one_line_per_epoch_and_a_degenerate_validation_is_said_once(
        ray_session, one_bleeding_patient, tmp_path):
    code, log, _ = _run(["train", "--data", str(one_bleeding_patient / "data" / "dicoms"),
                         "--labels", str(one_bleeding_patient / "data" / "labels.csv"), "--storage-path",
                         str(tmp_path / "runs"), "--name", "plain", "--epochs", "2", "--workers", "1", *TINY,
                         "--set", "augment.on=device"],  # and the recipe's augmentation in the training step
                        tmp_path, ray_session)
    assert code == 0, log[-3000:]
    assert not ESCAPES.search(log), [line for line in log.splitlines() if ESCAPES.search(line)][:3]
    for epoch in (1, 2):
        assert len(re.findall(rf"^\[train plain\] epoch {epoch}/2 ", log, re.M)) == 1, log
    assert len(re.findall("validation side has no image with a bleed", log)) == 1
    assert "UserWarning: Error fetching version info" not in log  # albumentations stays offline and quiet
    metrics = pd.read_csv(tmp_path / "runs" / "plain" / "metrics.csv")
    assert list(metrics["val_degenerate"]) == [1, 1] and list(metrics["val_positives"]) == [0, 0]
    (result,) = [line for line in log.splitlines() if line.startswith('{"run_dir"')]  # the one result line
    assert strict_json(result)["epochs"] == 2


def test_tune_with_relative_paths_from_another_working_directory(ray_session, one_bleeding_patient, tmp_path):
    # Tune runs each trial in a working directory of its own: relative paths must be resolved before that.
    work = tmp_path / "elsewhere"
    work.mkdir()
    data = os.path.relpath(one_bleeding_patient / "data", work)
    code, log, _ = _run(["tune", "--data", f"{data}/dicoms", "--labels", f"{data}/labels.csv",
                         "--storage-path", "sweeps", "--name", "rel", "--num-samples", "1", "--max-epochs", "1",
                         "--workers-per-trial", "1", "--mlflow-uri", "mlruns", *TINY], work, ray_session)
    assert code == 0, log[-3000:]
    sweep = work / "sweeps" / "rel"
    trials = pd.read_csv(sweep / "trials.csv")
    assert len(trials) == 1 and trials["error"].isna().all() and trials["val_degenerate"].tolist() == [1]
    assert (sweep / "best" / "model.pt").is_file() and (sweep / "trials" / trials["trial"][0] / "metrics.csv").is_file()
    assert len(re.findall(r"trial \w+ started", log)) == 1 and len(re.findall(r"trial \w+ ended", log)) == 1
    assert not ESCAPES.search(log) and "Trial status" not in log and "Configuration for experiment" not in log

    # MLflow (a relative folder, resolved where the command started): the trial's run through Ray Tune's MLflow
    # logger, with the recipe and the trial's lr/decay as params, its epochs, and the best checkpoint as artifact.
    client = mlflow_client(work / "mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("raysys").experiment_id])
    params = run.data.params
    assert float(params["lr"]) == pytest.approx(trials["lr"][0]) and float(params["decay"]) == pytest.approx(trials["decay"][0])
    assert params["data.image_size"] == "80" and params["train.batch_size"] == "4"
    history = client.get_metric_history(run.info.run_id, "val_weighted_log_loss")
    assert [m.value for m in history] == pytest.approx([trials["best_val_weighted_log_loss"][0]])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")} >= {
        "best_checkpoint/model.pt", "best_checkpoint/meta.json"}


def mlflow_client(folder: Path):
    """MLflow's own client on a file store (MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE to read one)."""
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    import mlflow

    return mlflow.MlflowClient(tracking_uri=str(folder))


@pytest.mark.parametrize("weights, message", [
    ("imagenet", "could not download the ImageNet weights"),
    ("missing/inception.pth", "missing/inception.pth: no such file"),
])
def test_bad_weights_fail_on_the_driver_in_seconds_with_one_message(ray_session, one_bleeding_patient, tmp_path,
                                                                     weights, message):
    # An empty torch cache and an unreachable proxy: the ImageNet download fails as it does offline.
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    args = ["train", "--data", str(one_bleeding_patient / "data" / "dicoms"), "--labels",
            str(one_bleeding_patient / "data" / "labels.csv"), "--storage-path", str(tmp_path / "runs"),
            "--weights", weights, "--epochs", "1", "--image-size", "80"]
    code, log, seconds = _run(args, tmp_path, ray_session, env=env)
    assert code == 1 and seconds < 30, (code, seconds, log[-2000:])
    assert log.count(message) == 1, log
    assert "Traceback" not in log and "scan " not in log and "[train" not in log  # no data scanned, no worker
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--labels", "labels.csv"], "raysys train: missing --data"),
    (["train", "--data", "dicoms"], "raysys train: missing --labels"),
    (["train-sequence", "--data", "dicoms", "--labels", "labels.csv"], "raysys train-sequence: missing --checkpoint"),
    (["tune", "--stage", "sequence", "--checkpoint", "best", "--data", "dicoms", "--labels", "labels.csv",
      "--image-size", "128", "--amp", "bf16"], "--image-size, --amp set the CNN's training"),
])
def test_a_missing_or_misplaced_flag_is_named_before_anything_starts(tmp_path, monkeypatch, caplog, args, message):
    from raysys.cli import main

    monkeypatch.chdir(tmp_path)  # no Ray address given: a command that got past its checks would start a Ray here
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1 and message in caplog.text, caplog.text
    assert not (tmp_path / "runs").exists()  # nothing ran

def test_tune_batch_size_with_the_sequence_stage_sets_the_sequence_stages():
    from raysys.cli import _config, _sequence_flags, build_parser

    args = build_parser().parse_args(["tune", "--stage", "sequence", "--checkpoint", "/ck", "--batch-size", "3"])
    _sequence_flags(args)
    cfg = _config(args)
    assert cfg.sequence.batch_size == 3 and cfg.train.batch_size == Config().train.batch_size


def test_the_demo_clears_only_a_folder_of_its_own(tmp_path):
    from raysys.demo import MARKER, StageError, clear_workdir

    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="not a raysys demo's"):
        clear_workdir(project)
    assert (project / "notes.txt").read_text() == "mine"  # refused, not deleted
    demo = tmp_path / "demo"
    clear_workdir(demo)  # a new folder: made and marked
    (demo / "summary.json").write_text("{}")
    clear_workdir(demo)  # its own: emptied for the next demo
    assert sorted(p.name for p in demo.iterdir()) == [MARKER]
