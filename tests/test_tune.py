"""Ray Tune sweep on a real local Ray: trials are Ray Train runs, ASHA stops some, best/ is exported,
and a sweep whose driver was killed resumes under the same name from object storage (the session's S3 server)."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raysys import storage
from raysys.config import Config
from raysys.model import load_checkpoint
from raysys.testing import small_phantom, strict_json
from raysys.train import SCORE
from raysys.tune import RUNGS_FILE, ResumableASHA, StrictJsonLogger, best_report, max_concurrent_trials, sweep

BUCKET = "s3://raysys-test"  # created by the s3_endpoint fixture


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune-phantom")
    small_phantom(out, seed=7)
    return out


# A sweep driver of its own on the test session's Ray, so that the test can kill it mid-sweep.
DRIVER = """
import json, sys
import ray
from raysys.config import from_dict
from raysys.tune import sweep
base, address = json.loads(sys.argv[1])
ray.init(address=address, log_to_driver=False)
sweep(from_dict(base, {}))
"""


def _reported(tuner: str) -> dict[str, list[dict]]:
    """Tune's own record of every trial's results, read from the bucket: {trial folder name: [result dicts]}."""
    if not storage.is_dir(tuner):
        return {}
    return {path.rsplit("/", 2)[-2]: [strict_json(line) for line in storage.read_text(path).splitlines()]
            for path in storage.list_files(tuner, "/result.json")}


def _files(folder: str) -> list[str]:
    return [path.rsplit("/", 1)[-1] for path in storage.list_files(folder, "")] if storage.is_dir(folder) else []


def _kill_driver_after_first_result(cmd, env, tuner, timeout=300):
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and driver.poll() is None:
            if any(_reported(tuner).values()):
                time.sleep(2)  # past the next experiment-state save (every second here)
                break
            time.sleep(1)
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        assert any(_reported(tuner).values()), "no trial reported in time"
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies; Ray reaps its trials and their Train runs
        driver.wait()


def test_sweep_resumes_from_the_bucket_after_its_driver_is_killed_runs_asha_and_exports_the_best(
        ray_session, phantom, caplog):
    # Learning rates from 1e-5 to 1: the large ones wreck the model. Whether ASHA stops one here depends on the
    # order results arrive in (a trial is cut when worse than those before it at its rung); the test below checks
    # its decisions with results in a fixed order.
    sweep_dir = f"{BUCKET}/tune-kill/s"
    cfg = Config().replace(**{
        "data.data": str(phantom / "dicoms"), "data.labels": str(phantom / "labels.csv"), "data.image_size": 80,
        "data.val_fraction": 0.3, "model.weights": "none", "train.batch_size": 4, "train.workers": 1,
        "train.cpus_per_worker": 1.0, "train.max_steps_per_epoch": 2, "sweep.storage_path": f"{BUCKET}/tune-kill",
        "sweep.name": "s", "sweep.num_samples": 2, "sweep.max_epochs": 3, "sweep.grace_period": 1,
        "sweep.reduction_factor": 2, "sweep.lr_min": 1e-5, "sweep.lr_max": 1.0, "sweep.seed": 3,
    })
    # One trial at a time: 2 CPUs // (one 1-CPU worker + 0.5 CPU kept for decoding). The second trial is still
    # waiting when the first driver is killed, and the first has epochs to go (each takes ~2 s here), so the sweep
    # cannot end by itself before the kill.
    assert max_concurrent_trials(cfg) == 1

    # The first driver is killed as soon as one trial has reported ...
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "token", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cmd = [sys.executable, "-c", DRIVER, json.dumps([cfg.to_dict(), address])]
    tuner = f"{sweep_dir}/tuner"
    _kill_driver_after_first_result(cmd, env, tuner)
    before = {name: rows for name, rows in _reported(tuner).items() if rows}
    assert not storage.exists(f"{sweep_dir}/trials.csv")  # killed mid-sweep: no summary yet

    # ... and the same sweep relaunched under the same name finds its state in the bucket and resumes it: same
    # trials, their results kept.
    with caplog.at_level(logging.INFO, logger="raysys.tune"):
        result = sweep(cfg)
    assert f"resuming sweep {tuner}" in caplog.text
    assert result.sweep_dir == sweep_dir
    after = _reported(tuner)
    assert set(before) <= set(after) and len(after) == 2  # no fresh sweep: the interrupted trial carried on
    for name, rows in before.items():
        assert after[name][:len(rows)] == rows
    # ASHA's rungs came back too (Tune itself forgets them): every trial's epoch-1 score is on the first rung.
    (first_rung,) = [r["recorded"] for r in json.loads(storage.read_text(f"{sweep_dir}/{RUNGS_FILE}"))[0]
                     if r["milestone"] == 1]
    epoch_1 = {r["trial_id"]: r[SCORE] for rows in after.values() for r in rows if r["epoch"] == 1}
    assert {t: -v for t, v in first_rung.items()} == pytest.approx(epoch_1)

    trials = pd.read_csv(storage.open_bytes(f"{sweep_dir}/trials.csv"))
    assert len(trials) == 2 and trials["error"].isna().all()  # empty in the CSV: no trial failed
    assert (trials["stopped_early"] == (trials["epochs_run"] < 3)).all()
    assert (trials["epochs_run"] == 3).any()  # the best trial at every rung is never stopped
    assert ((trials["lr"] >= 1e-5) & (trials["lr"] <= 1.0)).all()
    assert ((trials["decay"] >= 0.5) & (trials["decay"] <= 1.0)).all()

    # trials.csv agrees with what each trial reported to Tune (Tune's own result.json per trial).
    for _, row in trials.iterrows():
        # A trial started just before the kill gets a second folder on resume; its results are in one of them.
        (name,) = [n for n, rows in after.items() if f"{row['trial']}_" in n and rows]
        run = f"{sweep_dir}/trials/{row['trial']}"
        assert storage.is_file(f"{run}/config.yaml")  # its own Train run
        # Tune's CSV and JSON result files, not its TensorBoard events: the trial's Train run wrote its own.
        assert "progress.csv" in _files(f"{tuner}/{name}")
        assert not [f for f in _files(f"{tuner}/{name}") if f.startswith("events.out.tfevents")]
        assert [f for f in _files(f"{run}/tensorboard") if f.startswith("events.out.tfevents")]
        reported = pd.DataFrame(after[name])
        assert row["best_" + SCORE] == pytest.approx(reported[SCORE].min())
        assert row["epochs_run"] == reported["epoch"].max()
        # Its best epoch's checkpoint: one reported with the lowest score (a diverged trial reports the same clipped
        # loss every epoch), and one that Train kept.
        lowest = reported[reported[SCORE] == reported[SCORE].min()]
        assert row["checkpoint"] in {storage.with_scheme(p, sweep_dir) for p in lowest["checkpoint_path"].dropna()}
        assert storage.is_dir(row["checkpoint"])
    # The interrupted trial's Train run carried on from its last checkpoint in the bucket: no epoch trained twice,
    # and its last epochs were run by the relaunched worker group (start_epoch > 1).
    for name in before:
        (trial,) = [t for t in trials["trial"] if f"{t}_" in name]
        history = pd.read_csv(storage.open_bytes(f"{sweep_dir}/trials/{trial}/metrics.csv"))
        assert list(history["epoch"]) == list(range(1, len(history) + 1))
        assert history["start_epoch"].iloc[-1] > 1, history

    # best/ is the checkpoint of the trial with the lowest reported metric, and it loads from the bucket.
    winner = trials.loc[trials["best_" + SCORE].idxmin()]
    summary = json.loads(storage.read_text(f"{result.best_dir}/metrics.json"))
    assert summary["trial"] == winner["trial"]
    assert summary[SCORE] == pytest.approx(winner["best_" + SCORE])
    ck = load_checkpoint(result.best_dir)
    assert ck.meta["metrics"][SCORE] == pytest.approx(winner["best_" + SCORE])
    assert len(storage.read_bytes(f"{sweep_dir}/sweep.png")) > 0


def test_the_best_report_of_a_trial_is_a_checkpoint_its_train_run_kept_when_scores_tie(ray_session, tmp_path):
    # A diverged trial reports the same clipped loss every epoch. Train keeps the latest of equal scores and deletes
    # the earlier ones once more than keep_checkpoints are ranked; the sweep must export a checkpoint that still exists.
    import ray.train
    from ray.train.torch import TorchTrainer

    reports = tmp_path / "reports.jsonl"

    class Record(ray.train.UserCallback):  # what Tune's TuneReportCallback sees of every report
        def after_report(self, run_context, metrics, checkpoint):
            with open(reports, "a") as f:
                f.write(json.dumps({**metrics[0], "checkpoint_path": checkpoint.path if checkpoint else None}) + "\n")

    def loop(config):
        import tempfile

        import ray.train

        for epoch, score in enumerate([0.9, 0.7, 0.7, 0.7, 0.7], start=1):
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = ray.train.Checkpoint.from_directory(tmp) if epoch != 3 else None
                ray.train.report({"epoch": epoch, SCORE: score}, checkpoint=checkpoint)

    TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.25}),
                 run_config=ray.train.RunConfig(
                     name="ties", storage_path=str(tmp_path), callbacks=[Record()],
                     checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=SCORE,
                                                                  checkpoint_score_order="min"))).fit()
    history = pd.DataFrame([json.loads(line) for line in reports.read_text().splitlines()])
    kept = {p.name for p in (tmp_path / "ties").glob("checkpoint_*") if p.is_dir()}
    assert len(kept) == 2
    best = history.loc[best_report(history)]
    assert best[SCORE] == 0.7 and best["epoch"] == 5 and Path(best["checkpoint_path"]).name in kept
    assert Path(history.loc[history[SCORE].idxmin(), "checkpoint_path"]).name not in kept  # the first of equals: gone


# A diverged trial's -inf at a rung makes numpy's percentile interpolate through infinity (a NaN cutoff, so Ray's ASHA
# continues the trial), in memory as after a restart.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_resumable_asha_stops_worse_trials_and_remembers_its_rungs_across_a_restart(tmp_path):
    from ray.tune.experiment import Trial

    def scheduler():  # as Tuner.restore rebuilds it: a fresh object, the same rungs file
        return ResumableASHA(tmp_path / RUNGS_FILE, time_attr="epoch", max_t=3, grace_period=1, reduction_factor=2,
                             metric=SCORE, mode="min")

    def report(asha, trial_id, score):
        trial = Trial("run_trial", config={}, trial_id=trial_id, stub=True)
        asha.on_trial_add(None, trial)
        return asha.on_trial_result(None, trial, {"epoch": 1, SCORE: score})

    first = scheduler()
    assert [report(first, f"t{i}", v) for i, v in enumerate([0.5, 0.4, 0.9])] == ["CONTINUE", "CONTINUE", "STOP"]
    assert report(scheduler(), "t3", 0.95) == "STOP"  # judged against the rung the first scheduler recorded
    (tmp_path / RUNGS_FILE).unlink()
    assert report(scheduler(), "t4", 0.95) == "CONTINUE"  # Tune's own restore: an empty rung stops nothing

    # A diverged trial (infinite score, stored as null) read back: the restarted scheduler judges as the one that
    # kept its rungs in memory (the median of 0.4, 0.6 and inf is 0.6).
    (tmp_path / RUNGS_FILE).unlink()
    kept = scheduler()
    for i, score in enumerate([math.inf, 0.4, 0.6]):
        report(kept, f"d{i}", score)
    assert report(scheduler(), "x", 0.7) == report(kept, "x", 0.7) == "STOP"


def test_tunes_result_files_are_strict_json(ray_session, tmp_path):
    """Tune's result.json as raysys configures it: NaN and infinities as null (Python's own parser would accept
    the NaN and Infinity tokens Tune writes; strict_json, like other parsers, does not)."""
    from ray.train._internal.storage import StorageContext  # what Tune gives each trial
    from ray.tune.experiment import Trial

    logger = StrictJsonLogger()
    trial = Trial("run_trial", config={}, trial_id="t0", stub=True,
                  storage=StorageContext(storage_path=str(tmp_path), experiment_dir_name="tuner", trial_dir_name="t0"))
    trial.init_local_path()  # as Tune does before its loggers run
    logger.log_trial_result(1, trial, {"epoch": 1, SCORE: math.inf, "val_auc_epidural": math.nan, "lr": 5e-4})
    logger.log_trial_end(trial)
    (line,) = (Path(trial.local_path) / "result.json").read_text().splitlines()
    assert strict_json(line) == {"epoch": 1, SCORE: None, "val_auc_epidural": None, "lr": 5e-4}
