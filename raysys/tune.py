"""Ray Tune: sweep learning rate and decay over Ray Train runs, ASHA on validation loss; export the best."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
from ray import tune

from raysys.config import Config, save_config
from raysys.train import SCORE, Split, fit, load_split

log = logging.getLogger(__name__)

BEST_DIR = "best"
RUNGS_FILE = "asha_rungs.json"


@dataclass(frozen=True)
class SweepConfig:
    num_samples: int = 4  # trials drawn from the search space
    max_epochs: int = 8  # epochs of a trial that ASHA never stops (the recipe's 8)
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2  # ASHA keeps the best 1/rf of trials at each rung
    lr_min: float = 1e-5  # log-uniform learning-rate bounds around the recipe's 5e-4
    lr_max: float = 3e-3
    decay_min: float = 0.5  # uniform per-epoch decay bounds around the recipe's 0.8
    decay_max: float = 1.0
    max_trial_failures: int = 1  # retries of a crashed trial driver (Tune's FailureConfig)
    seed: int = 0  # search-space sampling

    def __post_init__(self) -> None:
        if not 0 < self.lr_min <= self.lr_max:
            raise ValueError(f"need 0 < lr_min <= lr_max, got {self.lr_min}, {self.lr_max}")
        if not 0 < self.decay_min <= self.decay_max <= 1:
            raise ValueError(f"need 0 < decay_min <= decay_max <= 1, got {self.decay_min}, {self.decay_max}")
        if self.num_samples < 1 or self.max_epochs < 1 or not 1 <= self.grace_period <= self.max_epochs:
            raise ValueError("need num_samples >= 1, max_epochs >= 1 and 1 <= grace_period <= max_epochs")


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: Path
    best_dir: Path  # exported checkpoint: accepted by serve, predict and train --weights
    trials: pd.DataFrame


def search_space(sweep: SweepConfig) -> dict:
    return {"lr": tune.loguniform(sweep.lr_min, sweep.lr_max), "decay": tune.uniform(sweep.decay_min, sweep.decay_max)}


def max_concurrent_trials(cfg: Config, data_reserve_cpus: float = 0.5) -> int:
    """Trials that fit the cluster at once: by GPUs when trials use them, else by CPUs.

    `data_reserve_cpus` stays free for Ray Data's decode tasks so no trial starves its own input.
    """
    t, resources = cfg.train, ray.cluster_resources()
    if t.gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // (t.workers * t.gpus_per_worker)))
    need = t.workers * t.cpus_per_worker + data_reserve_cpus
    return max(1, int(resources.get("CPU", 1) // need))


class ResumableASHA(tune.schedulers.ASHAScheduler):
    """ASHA whose rung records survive a relaunch of the sweep.

    `Tuner.restore` rebuilds the scheduler as it was when the sweep began (Ray Tune saves no scheduler
    state, ray-project/ray#30838), so a resumed sweep would forget every score at every rung and stop
    fewer trials. This one writes its rungs to `state_path` after each result and reads them back when
    the first trial is re-added. Trial ids survive `Tuner.restore`, so every record still applies.
    """

    def __init__(self, state_path: str | Path, **kwargs):
        super().__init__(**kwargs)
        self._state_path = str(state_path)
        self._loaded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._loaded:
            self._loaded = True
            path = Path(self._state_path)
            if path.is_file():
                for bracket, rungs in zip(self._brackets, json.loads(path.read_text())):
                    for (milestone, recorded), saved in zip(bracket._rungs, rungs):
                        if float(saved["milestone"]) == float(milestone):
                            recorded.update(saved["recorded"])
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def _save(self) -> None:
        state = [[{"milestone": milestone, "recorded": recorded} for milestone, recorded in bracket._rungs]
                 for bracket in self._brackets]
        tmp = Path(self._state_path + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state_path)


def run_trial(config: dict, base: dict, split: Split, trials_path: str) -> None:
    """One Tune trial: a whole Ray Train run with this trial's lr and decay, metrics sent to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysys.config import from_dict

    trial_id = tune.get_context().get_trial_id()  # the Train run is named after its trial
    cfg = from_dict(base, {"train.lr": config["lr"], "train.decay": config["decay"],
                           "train.storage_path": trials_path, "train.name": trial_id})
    fit(cfg, split=split, callbacks=[TuneReportCallback()])


def sweep(cfg: Config, sweep_cfg: SweepConfig, out: str | Path, name: str = "sweep") -> SweepResult:
    """Run (or resume) the sweep `name` under `out`; write trials.csv, sweep.png and `out/best/`."""
    sweep_dir = (Path(out) / name).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(**{"train.epochs": sweep_cfg.max_epochs})
    save_config(cfg, sweep_dir / "config.yaml")
    split = load_split(cfg, sweep_dir)  # once for all trials: they share data, split and errors.csv
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), split=split, trials_path=str(sweep_dir / "trials")),
        {"CPU": 0.01},  # the trial driver only waits on its Train run; its CPU goes to decoding
    )
    tuner_path = sweep_dir / "tuner"
    if tune.Tuner.can_restore(str(tuner_path)):
        log.info("resuming sweep %s", tuner_path)
        tuner = tune.Tuner.restore(str(tuner_path), trainable=trainable, resume_errored=True)
    else:
        (sweep_dir / RUNGS_FILE).unlink(missing_ok=True)  # rungs of an earlier sweep without a Tune state
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep_cfg),
            tune_config=tune.TuneConfig(
                metric=SCORE,
                mode="min",
                num_samples=sweep_cfg.num_samples,
                # max_t one past the last epoch: a trial that runs all its epochs ends by itself (and writes
                # its reports) instead of being stopped by ASHA at max_t.
                scheduler=ResumableASHA(
                    sweep_dir / RUNGS_FILE, time_attr="epoch", max_t=sweep_cfg.max_epochs + 1,
                    grace_period=sweep_cfg.grace_period, reduction_factor=sweep_cfg.reduction_factor,
                ),
                # A search_alg given here must carry the concurrency limit itself (Tune ignores max_concurrent_trials).
                search_alg=tune.search.BasicVariantGenerator(random_state=sweep_cfg.seed,
                                                             max_concurrent=max_concurrent_trials(cfg)),
            ),
            run_config=tune.RunConfig(
                name="tuner", storage_path=str(sweep_dir),
                failure_config=tune.FailureConfig(max_failures=sweep_cfg.max_trial_failures),
                progress_reporter=tune.CLIReporter(
                    metric_columns=["epoch", SCORE, "train_loss"], parameter_columns=["lr", "decay"],
                    max_report_frequency=15),
            ),
        )
    grid = tuner.fit()
    trials = trials_table(grid, sweep_cfg.max_epochs)
    trials.to_csv(sweep_dir / "trials.csv", index=False)
    from raysys.report import sweep_plot

    sweep_plot(sweep_dir / "sweep.png", trials, score=SCORE)
    best_dir = export_best(trials, sweep_dir / BEST_DIR)
    print(f"best checkpoint: {best_dir}")
    return SweepResult(sweep_dir=sweep_dir, best_dir=best_dir, trials=trials)


def trials_table(grid, max_epochs: int) -> pd.DataFrame:
    """One row per trial: lr, decay, epochs run, best score, stopped early, best checkpoint path."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        row = {"trial": trial_id, "lr": result.config["lr"],
               "decay": result.config["decay"], "epochs_run": 0, "best_" + SCORE: math.nan,
               "stopped_early": False, "checkpoint": "", "error": str(result.error or "")}
        if history is not None and SCORE in history:
            best = history.loc[history[SCORE].idxmin()]
            row.update({"epochs_run": int(history["epoch"].max()), "best_" + SCORE: float(best[SCORE]),
                        "checkpoint": best.get("checkpoint_path", "") or ""})
            row["stopped_early"] = row["epochs_run"] < max_epochs and result.error is None
        elif not row["error"]:
            row["error"] = "no metrics reported"
        rows.append(row)
    return pd.DataFrame(rows).sort_values("best_" + SCORE, na_position="last").reset_index(drop=True)


def export_best(trials: pd.DataFrame, best_dir: Path) -> Path:
    """Copy the best trial's best checkpoint to `best_dir` with metrics.json beside it."""
    ok = trials[trials["checkpoint"].astype(bool)]
    if ok.empty:
        raise RuntimeError("no trial produced a checkpoint; see trials.csv for the errors")
    top = ok.iloc[0]
    if best_dir.exists():
        shutil.rmtree(best_dir)
    shutil.copytree(top["checkpoint"], best_dir)
    meta = json.loads((best_dir / "meta.json").read_text())
    summary = {"trial": top["trial"], "lr": float(top["lr"]), "decay": float(top["decay"]),
               SCORE: float(top["best_" + SCORE]), "epoch": meta["epoch"], "source": str(top["checkpoint"]),
               "metrics": {k: v for k, v in meta["metrics"].items() if k != "history"}}
    (best_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return best_dir
