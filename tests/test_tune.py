"""Ray Tune sweep on a real local Ray: trials are Ray Train runs, ASHA stops some, best/ is exported."""

import json

import numpy as np
import pandas as pd
import pytest

from raysys.config import Config
from raysys.model import load_checkpoint
from raysys.phantom import DENSE_PREVALENCE, PhantomConfig, write_dataset
from raysys.train import SCORE
from raysys.tune import SweepConfig, max_concurrent_trials, sweep


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune-phantom")
    write_dataset(out, PhantomConfig(studies=10, slices_per_study=(4, 5), size=96, seed=7,
                                     prevalence=DENSE_PREVALENCE))
    return out


def test_sweep_runs_trials_with_asha_and_exports_the_best(ray_session, phantom, tmp_path):
    cfg = Config().replace(**{
        "data.data": str(phantom / "dicoms"), "data.labels": str(phantom / "labels.csv"), "data.image_size": 80,
        "data.val_fraction": 0.3, "model.weights": "none", "train.batch_size": 4, "train.workers": 1,
        "train.max_steps_per_epoch": 2,
    })
    assert max_concurrent_trials(cfg) == 2  # 2 CPUs // (one 0.5-CPU worker + 0.5 CPU kept for decoding)
    # Learning rates from 1e-5 to 1: the large ones wreck the model, so ASHA has losers to stop.
    sweep_cfg = SweepConfig(num_samples=4, max_epochs=2, grace_period=1, reduction_factor=2, lr_min=1e-5, lr_max=1.0,
                            seed=3)
    result = sweep(cfg, sweep_cfg, out=tmp_path, name="s")

    trials = pd.read_csv(result.sweep_dir / "trials.csv")
    assert len(trials) == 4 and trials["error"].isna().all()  # empty in the CSV: no trial failed
    assert trials["stopped_early"].any() and (trials["epochs_run"] < 2).any()
    assert (trials["epochs_run"] == 2).any()
    assert ((trials["lr"] >= 1e-5) & (trials["lr"] <= 1.0)).all()
    assert ((trials["decay"] >= 0.5) & (trials["decay"] <= 1.0)).all()

    # trials.csv agrees with what each trial reported to Tune (Tune's own result.json per trial).
    for _, row in trials.iterrows():
        (trial_dir,) = (result.sweep_dir / "tuner").glob(f"*{row['trial']}_*")
        assert (result.sweep_dir / "trials" / row["trial"] / "config.yaml").is_file()  # its own Train run
        reported = pd.DataFrame([json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()])
        assert row["best_" + SCORE] == pytest.approx(reported[SCORE].min())
        assert row["epochs_run"] == reported["epoch"].max()
        assert row["checkpoint"] == reported.loc[reported[SCORE].idxmin(), "checkpoint_path"]

    # best/ is the checkpoint of the trial with the lowest reported metric, and it loads.
    winner = trials.loc[trials["best_" + SCORE].idxmin()]
    summary = json.loads((result.best_dir / "metrics.json").read_text())
    assert summary["trial"] == winner["trial"]
    assert summary[SCORE] == pytest.approx(winner["best_" + SCORE])
    ck = load_checkpoint(result.best_dir)
    assert ck.meta["metrics"][SCORE] == pytest.approx(winner["best_" + SCORE])
    assert (result.sweep_dir / "sweep.png").stat().st_size > 0
