"""Ray Tune sweep on a real local Ray: trials are Ray Train runs, ASHA stops some, best/ is exported,
and a sweep whose driver was killed resumes under the same name."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raysys.config import Config
from raysys.model import load_checkpoint
from raysys.testing import small_phantom
from raysys.train import SCORE
from raysys.tune import RUNGS_FILE, ResumableASHA, max_concurrent_trials, sweep


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


def _reported(tuner_dir):
    """Tune's own record of every trial's results: {trial dir name: [result dicts]}."""
    return {d.name: [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
            for d in tuner_dir.iterdir() if (d / "result.json").is_file()}


def _kill_driver_after_first_result(cmd, env, tuner_dir, timeout=300):
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and driver.poll() is None:
            if tuner_dir.is_dir() and any(_reported(tuner_dir).values()):
                time.sleep(3)  # past the next experiment-state save (every second here)
                break
            time.sleep(1)
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        assert any(_reported(tuner_dir).values()), "no trial reported in time"
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies; Ray reaps its trials and their Train runs
        driver.wait()


def test_sweep_resumes_after_its_driver_is_killed_runs_asha_and_exports_the_best(ray_session, phantom, tmp_path):
    # Learning rates from 1e-5 to 1: the large ones wreck the model. Whether ASHA stops one here depends on the
    # order results arrive in (a trial is cut when worse than those before it at its rung); the test below checks
    # its decisions with results in a fixed order.
    cfg = Config().replace(**{
        "data.data": str(phantom / "dicoms"), "data.labels": str(phantom / "labels.csv"), "data.image_size": 80,
        "data.val_fraction": 0.3, "model.weights": "none", "train.batch_size": 4, "train.workers": 1,
        "train.cpus_per_worker": 1.0, "train.max_steps_per_epoch": 2, "sweep.storage_path": str(tmp_path),
        "sweep.name": "s", "sweep.num_samples": 2, "sweep.max_epochs": 2, "sweep.grace_period": 1,
        "sweep.reduction_factor": 2, "sweep.lr_min": 1e-5, "sweep.lr_max": 1.0, "sweep.seed": 3,
    })
    # One trial at a time: 2 CPUs // (one 1-CPU worker + 0.5 CPU kept for decoding). The second trial is still
    # waiting when the first driver is killed, so the sweep cannot end by itself before the kill.
    assert max_concurrent_trials(cfg) == 1

    # The first driver is killed as soon as one trial has reported ...
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "token", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    cmd = [sys.executable, "-c", DRIVER, json.dumps([cfg.to_dict(), address])]
    tuner_dir = tmp_path / "s" / "tuner"
    _kill_driver_after_first_result(cmd, env, tuner_dir)
    before = {name: rows for name, rows in _reported(tuner_dir).items() if rows}
    assert not (tmp_path / "s" / "trials.csv").exists()

    # ... and the same sweep relaunched under the same name resumes it: same trials, their results kept.
    result = sweep(cfg)
    sweep_dir = Path(result.sweep_dir)
    after = _reported(tuner_dir)
    assert set(before) <= set(after) and len(after) == 2  # no fresh sweep: the interrupted trial carried on
    for name, rows in before.items():
        assert after[name][:len(rows)] == rows
    # ASHA's rungs came back too (Tune itself forgets them): every trial's epoch-1 score is on the first rung.
    (first_rung,) = [r["recorded"] for r in json.loads((tmp_path / "s" / RUNGS_FILE).read_text())[0]
                     if r["milestone"] == 1]
    epoch_1 = {r["trial_id"]: r[SCORE] for rows in after.values() for r in rows if r["epoch"] == 1}
    assert {t: -v for t, v in first_rung.items()} == pytest.approx(epoch_1)

    trials = pd.read_csv(sweep_dir / "trials.csv")
    assert len(trials) == 2 and trials["error"].isna().all()  # empty in the CSV: no trial failed
    assert (trials["stopped_early"] == (trials["epochs_run"] < 2)).all()
    assert (trials["epochs_run"] == 2).any()  # the best trial at every rung is never stopped
    assert ((trials["lr"] >= 1e-5) & (trials["lr"] <= 1.0)).all()
    assert ((trials["decay"] >= 0.5) & (trials["decay"] <= 1.0)).all()

    # trials.csv agrees with what each trial reported to Tune (Tune's own result.json per trial).
    for _, row in trials.iterrows():
        # A trial started just before the kill gets a second folder on resume; its results are in one of them.
        (trial_dir,) = [d for d in (sweep_dir / "tuner").glob(f"*{row['trial']}_*") if (d / "result.json").is_file()]
        assert (sweep_dir / "trials" / row["trial"] / "config.yaml").is_file()  # its own Train run
        # Tune's CSV and JSON result files, not its TensorBoard events: the trial's Train run wrote its own.
        assert (trial_dir / "progress.csv").is_file() and not list(trial_dir.glob("events.out.tfevents*"))
        assert list((sweep_dir / "trials" / row["trial"] / "tensorboard").glob("events.out.tfevents*"))
        reported = pd.DataFrame([json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()])
        assert row["best_" + SCORE] == pytest.approx(reported[SCORE].min())
        assert row["epochs_run"] == reported["epoch"].max()
        assert row["checkpoint"] == reported.loc[reported[SCORE].idxmin(), "checkpoint_path"]

    # best/ is the checkpoint of the trial with the lowest reported metric, and it loads.
    winner = trials.loc[trials["best_" + SCORE].idxmin()]
    summary = json.loads((Path(result.best_dir) / "metrics.json").read_text())
    assert summary["trial"] == winner["trial"]
    assert summary[SCORE] == pytest.approx(winner["best_" + SCORE])
    ck = load_checkpoint(result.best_dir)
    assert ck.meta["metrics"][SCORE] == pytest.approx(winner["best_" + SCORE])
    assert (sweep_dir / "sweep.png").stat().st_size > 0


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
