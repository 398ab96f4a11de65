"""Ray Tune: sweep learning rate and decay over Ray Train runs, ASHA on validation loss; export the best.

The runs are CNN trainings (stage "cnn") or sequence stages on one CNN's outputs (stage "sequence": the CNN
embeds the data once, on the driver's Ray, and every trial trains its GRU on the same series)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from raysys import storage
from raysys.config import Config, SweepConfig, from_dict, save_config
from raysys.model import read_meta
from raysys.runtime import env_default, remove_orphaned_placement_groups
from raysys.sequence import export_sequence
from raysys.tracking import RUN_DIR_TAG, mlflow_module, recipe_params
from raysys.train import SCORE, Split, fit_split, load_split, put_backbone
from raysys.train_sequence import SeriesData, fit_series, prepare_series

log = logging.getLogger(__name__)

BEST_DIR = "best"
RUNGS_FILE = "asha_rungs.json"
STAGES = ("cnn", "sequence")
AUTO_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # "1": Tune adds none of its default result loggers


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: str  # <sweep.storage_path>/<sweep.name>
    best_dir: str  # exported checkpoint: accepted by serve, predict and train --weights
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
            if storage.is_file(self._state_path):
                for bracket, rungs in zip(self._brackets, json.loads(storage.read_text(self._state_path))):
                    for (milestone, recorded), saved in zip(bracket._rungs, rungs):
                        if float(saved["milestone"]) == float(milestone):
                            # Strict JSON saved a diverged trial's -inf (its infinite score, negated) as null.
                            recorded.update({t: -math.inf if v is None else v for t, v in saved["recorded"].items()})
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        if result.get(self._time_attr, 0) >= self._max_t - 1:
            # The trial's last epoch may sit on a rung (grace 2 of 4 epochs puts one at 4). Stopping it there
            # saves nothing and kills the trial's driver before it writes metrics.csv and curves.png.
            return tune.schedulers.TrialScheduler.CONTINUE
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def _save(self) -> None:
        state = [[{"milestone": milestone, "recorded": recorded} for milestone, recorded in bracket._rungs]
                 for bracket in self._brackets]
        storage.write_text(self._state_path, storage.to_json(state, indent=None))


class TrialLog(tune.Callback):
    """One log line per trial event (start, end, error) in place of Tune's redrawn status tables."""

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        log.info("trial %s started: lr %.2e, decay %.3f", trial.trial_id, trial.config["lr"], trial.config["decay"])

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        log.info("trial %s ended after epoch %s: %s %.4f (%d of %d trials done)", trial.trial_id,
                 result.get("epoch", "?"), SCORE, result.get(SCORE, math.nan),
                 sum(t.status in ("TERMINATED", "ERROR") for t in trials) + 1, len(trials))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log.error("trial %s failed: %s", trial.trial_id, trial.error_file or "see trials.csv")


def run_trial(config: dict, base: dict, split: Split, backbone: ray.ObjectRef | None) -> None:
    """One Tune trial: a whole Ray Train run with this trial's lr and decay, metrics sent to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()  # the Train run is named after its trial, under the sweep's trials/
    cfg = from_dict(base, {"train.lr": config["lr"], "train.decay": config["decay"], "train.name": trial_id})
    fit_split(cfg, split, backbone, callbacks=[TuneReportCallback()])


def run_sequence_trial(config: dict, base: dict, series: SeriesData) -> None:
    """One Tune trial of the sequence stage: its GRU trained with this trial's lr and decay on the shared series."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = from_dict(base, {"sequence.lr": config["lr"], "sequence.decay": config["decay"], "train.name": trial_id})
    fit_series(cfg, series, callbacks=[TuneReportCallback()], export=False)


def sweep(cfg: Config, stage: str = "cnn") -> SweepResult:
    """Run (or resume) the sweep cfg.sweep.name under cfg.sweep.storage_path: trials.csv, sweep.png, best/.

    Every trial is a Ray Train run under `<sweep>/trials/<trial id>/`; the recipe's own
    train.storage_path and train.name are not used. stage "sequence" sweeps sequence.lr and
    sequence.decay of the sequence stage on cfg.sequence.cnn's outputs.
    """
    if stage not in STAGES:
        raise ValueError(f"sweep stage must be one of {STAGES}, got {stage!r}")
    s = cfg.sweep
    sweep_dir = storage.join(s.storage_path, s.name)
    epochs = "sequence.epochs" if stage == "sequence" else "train.epochs"
    cfg = cfg.replace(**{epochs: s.max_epochs, "train.storage_path": storage.join(sweep_dir, "trials"),
                         **({"train.workers": s.workers_per_trial} if s.workers_per_trial else {})})
    tracked, cfg = cfg, cfg.replace(**{"train.mlflow_uri": ""})  # trials are tracked by the sweep's Tune callback
    if stage == "sequence":
        save_config(tracked, sweep_dir)
        series = prepare_series(cfg, sweep_dir)  # once: every trial trains on the same CNN outputs
        trial = tune.with_parameters(run_sequence_trial, base=cfg.to_dict(), series=series)
    else:
        backbone = put_backbone(cfg)  # once, on this driver, before any data is scanned or trial started
        save_config(tracked, sweep_dir)
        split = load_split(cfg, sweep_dir)  # once for all trials: they share data, split and errors.csv
        trial = tune.with_parameters(run_trial, base=cfg.to_dict(), split=split, backbone=backbone)
    # The trial driver only waits on its Train run; its CPU goes to decoding.
    trainable = tune.with_resources(trial, {"CPU": 0.01})
    tuner_path = storage.join(sweep_dir, "tuner")
    rungs = storage.join(sweep_dir, RUNGS_FILE)
    if tune.Tuner.can_restore(tuner_path):
        log.info("resuming sweep %s", tuner_path)
        remove_orphaned_placement_groups()  # a killed driver's last Train run may have left its CPUs held
        tuner = tune.Tuner.restore(tuner_path, trainable=trainable, resume_errored=True)
    else:
        if storage.exists(rungs):
            storage.remove_file(rungs)  # rungs of an earlier sweep without a Tune state
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(s),
            tune_config=tune.TuneConfig(
                metric=SCORE,
                mode="min",
                num_samples=s.num_samples,
                # max_t one past the last epoch: a trial that runs all its epochs ends by itself (and writes
                # its reports) instead of being stopped by ASHA at max_t.
                scheduler=ResumableASHA(rungs, time_attr="epoch", max_t=s.max_epochs + 1,
                                        grace_period=s.grace_period, reduction_factor=s.reduction_factor),
                # A search_alg given here must carry the concurrency limit itself (Tune ignores max_concurrent_trials).
                search_alg=tune.search.BasicVariantGenerator(random_state=s.seed,
                                                             max_concurrent=max_concurrent_trials(cfg)),
            ),
            run_config=_tune_run_config(sweep_dir, s, _mlflow_callbacks(tracked, sweep_dir)),
        )
    with env_default(AUTO_LOGGERS_ENV, "1"):  # Tune's CSV and JSON result files (_tune_run_config), not its TensorBoard
        grid = tuner.fit()
    trials = trials_table(grid, s.max_epochs, sweep_dir)
    storage.write_text(storage.join(sweep_dir, "trials.csv"), trials.to_csv(index=False))
    from raysys.report import sweep_plot

    sweep_plot(storage.join(sweep_dir, "sweep.png"), trials, score=SCORE)
    best_dir = export_best(trials, storage.join(sweep_dir, BEST_DIR), sequence=stage == "sequence")
    _log_best_to_mlflow(tracked, sweep_dir, trials[trials["checkpoint"].astype(bool)].iloc[0]["trial"], best_dir)
    log.info("best checkpoint: %s", best_dir)
    return SweepResult(sweep_dir=sweep_dir, best_dir=best_dir, trials=trials)


def _tune_run_config(sweep_dir: str, s: SweepConfig, tracking: list) -> tune.RunConfig:
    return tune.RunConfig(
        name="tuner", storage_path=sweep_dir,
        failure_config=tune.FailureConfig(max_failures=s.max_trial_failures),
        verbose=0,  # no redrawn status tables: TrialLog writes one line per trial event
        # Tune's own result files, given here because AUTO_LOGGERS_ENV turns off the defaults (and with them Tune's
        # TensorBoard logger: each trial's Train run writes its own events, raysys.tracking, which Tune's would
        # repeat under tuner/, and Tune imports tensorboardX on the first result, 1.4-2.5 s on 2 cores that Ray
        # reported as a slow callback in four warnings).
        callbacks=[TrialLog(), CSVLoggerCallback(), StrictJsonLogger(), *tracking],
    )


class StrictJsonLogger(JsonLoggerCallback):
    """Tune's result.json logger, with null for NaN and infinities (a label without positives in validation has a
    NaN AUC, a diverged trial an infinite score), which Tune's own encoder writes as NaN and Infinity tokens."""

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        super().log_trial_result(iteration, trial, storage.finite(result))


class RecipeMLflowLogger(MLflowLoggerCallback):
    """Ray Tune's MLflow logger (one MLflow run per trial: its lr and decay, its metrics per epoch), with the sweep's
    recipe (the config every trial shares) added to each trial's params."""

    def __init__(self, recipe: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self.recipe = recipe

    def log_trial_start(self, trial) -> None:
        super().log_trial_start(trial)
        self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=self.recipe)


def _mlflow_callbacks(cfg: Config, sweep_dir: str) -> list:
    t = cfg.train
    if not t.mlflow_uri:
        return []
    mlflow_module(t.mlflow_uri)  # a clear message when MLflow is not installed
    return [RecipeMLflowLogger(recipe_params(cfg), tracking_uri=t.mlflow_uri, experiment_name=t.mlflow_experiment,
                               tags={RUN_DIR_TAG: sweep_dir})]


def _log_best_to_mlflow(cfg: Config, sweep_dir: str, trial: str, best_dir: str) -> None:
    """The exported best checkpoint as the artifact `best_checkpoint/` of its trial's MLflow run."""
    if not cfg.train.mlflow_uri:
        return
    client = mlflow_module(cfg.train.mlflow_uri).MlflowClient(tracking_uri=cfg.train.mlflow_uri)
    experiment = client.get_experiment_by_name(cfg.train.mlflow_experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1, filter_string=(
        f"tags.`{RUN_DIR_TAG}` = '{sweep_dir}' and tags.trial_name LIKE '%{trial}'"))
    if not runs:
        log.warning("MLflow: no run of trial %s in experiment %s; the best checkpoint is not logged there", trial,
                    cfg.train.mlflow_experiment)
        return
    client.log_artifacts(runs[0].info.run_id, str(storage.local_dir(best_dir)), artifact_path="best_checkpoint")


def trials_table(grid, max_epochs: int, sweep_dir: str) -> pd.DataFrame:
    """One row per trial: lr, decay, epochs run, best score, degenerate validation, stopped early, checkpoint."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        row = {"trial": trial_id, "lr": result.config["lr"],
               "decay": result.config["decay"], "epochs_run": 0, "best_" + SCORE: math.nan, "val_degenerate": 0,
               "stopped_early": False, "checkpoint": "", "error": str(result.error or "")}
        if history is not None and SCORE in history:
            best = history.loc[best_report(history)]
            path = best.get("checkpoint_path")
            path = path if isinstance(path, str) else ""  # absent, or NaN in a row reported without a checkpoint
            row.update({"epochs_run": int(history["epoch"].max()), "best_" + SCORE: float(best[SCORE]),
                        "val_degenerate": int(best.get("val_degenerate", 0)),
                        "checkpoint": storage.with_scheme(path, sweep_dir) if path else ""})
            row["stopped_early"] = row["epochs_run"] < max_epochs and result.error is None
        elif not row["error"]:
            row["error"] = "no metrics reported"
        rows.append(row)
    return pd.DataFrame(rows).sort_values("best_" + SCORE, na_position="last").reset_index(drop=True)


def best_report(history: pd.DataFrame) -> int:
    """The index of a trial's best report, as its Train run ranks checkpoints: the lowest score, and among equal
    scores the latest report with a checkpoint (Train keeps the latest of equals and deletes the earlier ones once
    more than keep_checkpoints are ranked: a diverged trial reports the same clipped loss every epoch)."""
    scores = history[SCORE]
    tied = history[scores == scores.min()] if scores.notna().any() else history  # all NaN: Train keeps the latest
    if "checkpoint_path" in tied:
        with_checkpoint = tied[tied["checkpoint_path"].apply(lambda p: isinstance(p, str) and bool(p))]
        tied = with_checkpoint if len(with_checkpoint) else tied
    return tied.index[-1]


def export_best(trials: pd.DataFrame, best_dir: str, sequence: bool = False) -> str:
    """Copy the best trial's best checkpoint to `best_dir` with metrics.json beside it (a sequence stage's with
    its CNN under cnn/, self-contained)."""
    ok = trials[trials["checkpoint"].astype(bool)]
    if ok.empty:
        raise RuntimeError("no trial produced a checkpoint; see trials.csv for the errors")
    top = ok.iloc[0]
    if sequence:
        export_sequence(top["checkpoint"], best_dir)
    else:
        storage.copy_tree(top["checkpoint"], best_dir)
    meta = read_meta(best_dir)
    summary = {"trial": top["trial"], "lr": float(top["lr"]), "decay": float(top["decay"]),
               SCORE: float(top["best_" + SCORE]), "val_degenerate": int(top["val_degenerate"]),
               "epoch": meta["epoch"], "source": str(top["checkpoint"]),
               "metrics": {k: v for k, v in meta["metrics"].items() if k != "history"}}
    storage.write_text(storage.join(best_dir, "metrics.json"), storage.to_json(summary))
    return best_dir
