"""raysys.runtime: what every process of a raysys job gets from init_ray, on the session's real local Ray."""

import os
import time

import numpy as np
from ray._private.ray_logging import LogDeduplicator

from raysys.executor_idle import IDLE_WAIT_S, IdleWait
from raysys.runtime import (
    CALLBACKS_ENV,
    STARVATION_WARNING_S,
    TRAIN_POLL_S,
    env_default,
    orphaned_placement_groups,
    process_env,
    remove_orphaned_placement_groups,
)

TASK_S = 0.8  # each task's length: two in a row end after Ray Data's first second with zero limits


def test_a_ray_data_execution_runs_tasks_side_by_side_from_its_start(ray_session):
    """Without worker_setup's fix, Ray Data runs each execution's first second one task at a time."""
    import ray

    def timed(batch: dict) -> dict:  # defined here: Ray's workers cannot import a test module
        start = time.time()
        time.sleep(TASK_S)
        return {"pid": np.array([os.getpid()]), "start": np.array([start]), "end": np.array([time.time()])}

    rows = ray.data.from_items([{"i": i} for i in range(4)], override_num_blocks=4)
    rows.map_batches(timed, batch_size=None, num_cpus=0.25).materialize()  # worker processes up and importing
    out = rows.map_batches(timed, batch_size=None, num_cpus=0.25).to_pandas().sort_values("start")
    first, second = out.iloc[0], out.iloc[1]
    assert second["start"] < first["end"], f"the first two tasks ran one after the other:\n{out}"
    assert first["pid"] != second["pid"]


def test_every_worker_process_of_the_job_runs_worker_setup(ray_session):
    """Train's split coordinators run Ray Data executors in worker processes: the fix must be there too."""
    import ray

    @ray.remote(num_cpus=0.25)
    def fixed() -> bool:
        from ray.data._internal.execution.resource_manager import ResourceManager

        return getattr(ResourceManager.get_global_limits, "raysys_fix", False)

    assert ray.get([fixed.remote() for _ in range(2)]) == [True, True]


def test_every_worker_process_gets_the_job_environment_where_trains_controller_reads_its_poll(ray_session):
    """Train's controller runs in a worker process of the job and reads RAY_TRAIN_HEALTH_CHECK_INTERVAL_S there;
    Train's split coordinators run Ray Data's executions there and read RAY_DATA_STARVATION_WARNING_DELAY_S."""
    import ray

    @ray.remote(num_cpus=0.1)
    def poll() -> tuple[str | None, str | None]:
        return os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"), os.environ.get("RAY_DATA_STARVATION_WARNING_DELAY_S")

    train_poll, starvation = ray.get(poll.remote())
    assert float(train_poll) == TRAIN_POLL_S < 2.0  # Ray's default is 2 s
    assert float(starvation) == STARVATION_WARNING_S > 60  # Ray's default is 60 s


def test_every_worker_process_registers_the_idle_wait_with_ray_data(ray_session):
    """Split coordinators and Train workers run Ray Data's executions in worker processes: the callback that stops
    the scheduling loop from spinning must be among the classes each execution there instantiates."""
    import ray

    @ray.remote(num_cpus=0.1)
    def registered() -> list[str]:
        from ray.data import DataContext

        return [f"{c.__module__}.{c.__qualname__}" for c in DataContext.get_current().execution_callback_classes]

    assert "raysys.executor_idle.IdleWait" in ray.get(registered.remote())


def test_the_users_own_execution_callbacks_are_kept_beside_raysys(monkeypatch):
    monkeypatch.setenv(CALLBACKS_ENV, "mylab.callbacks.Audit")
    assert process_env()[CALLBACKS_ENV] == "mylab.callbacks.Audit,raysys.executor_idle.IdleWait"
    monkeypatch.setenv(CALLBACKS_ENV, "raysys.executor_idle.IdleWait")
    assert process_env()[CALLBACKS_ENV] == "raysys.executor_idle.IdleWait"  # not twice


def test_idle_wait_sleeps_only_after_a_step_that_changed_nothing_right_after_another(ray_session):
    """On a real streaming execution: two steps with no progress between them in a row spin; a step after the
    consumer took a block, or one long after the last, does not."""
    import ray

    ds = ray.data.range(40, override_num_blocks=4).map_batches(lambda b: b, batch_size=None)
    executor = ds._create_executor()
    bundles = ds._build_bundle_iterator(executor)
    try:
        taken = next(iter(bundles))  # starts the execution and waits for its first output
        assert taken is not None
        wait = IdleWait()
        now = 1000.0
        assert not wait.idle(executor, now)  # nothing seen before
        while executor._topology and any(op.num_active_tasks() for op in executor._topology):
            time.sleep(0.05)  # let every task finish: from here on only the consumer can change anything
        assert not wait.idle(executor, now)  # progress since the first look (the tasks finished)
        assert wait.idle(executor, now + IDLE_WAIT_S / 2)  # no progress, right after: spinning
        assert not wait.idle(executor, now + 3 * IDLE_WAIT_S)  # no progress, but the loop had waited
        next(iter(bundles))  # the consumer takes a block
        assert not wait.idle(executor, now + 3.5 * IDLE_WAIT_S)
    finally:
        executor.shutdown(force=True)


def test_env_default_sets_a_variable_for_a_block_and_keeps_a_users_value(monkeypatch):
    name = "RAYSYS_TEST_ENV_DEFAULT"
    monkeypatch.delenv(name, raising=False)
    with env_default(name, "0.2"):
        assert os.environ[name] == "0.2"
    assert name not in os.environ
    monkeypatch.setenv(name, "1.5")
    with env_default(name, "0.2"):
        assert os.environ[name] == "1.5"
    assert os.environ[name] == "1.5"


def _worker_count_warning(multiple: int) -> str:  # the raylet's line, as a demo log had it
    return (f"WARNING: {2 * multiple} PYTHON worker processes have been started on node: a80746a004340533826823f2353a"
            f" with address: 192.0.2.2, which is {multiple}x the maximum expected startup concurrency (2). This could "
            "be a result of using a large number of actors, tasks blocked in ray.get() calls, or tasks with fractional"
            " CPU requests (e.g., num_cpus=0.1) allowing high concurrency.")


def test_rays_log_filter_keeps_a_warning_once_drops_its_repeats_and_folds_no_other_line():
    """Ray's own deduplicator (the driver's), set up as process_env sets it up."""
    env = process_env()
    assert env["RAY_DEDUP_LOGS"] == "1"
    dedup = LogDeduplicator(5, env["RAY_DEDUP_LOGS_ALLOW_REGEX"], env["RAY_DEDUP_LOGS_SKIP_REGEX"],
                            _timesource=lambda: 0.0)

    def printed(lines: list[str], pid) -> list[str]:
        return [line for batch in dedup.deduplicate({"lines": lines, "pid": pid, "ip": "192.0.2.2"})
                for line in batch["lines"]]

    warnings = [_worker_count_warning(k) for k in (4, 5, 6, 9, 10, 12, 40)]
    assert printed(warnings, "raylet") == warnings[:1]
    noise = ["[2026-11-29 20:59:45,631 E 9848 9956] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
             "and ID: '7c5d18f7177c8678' has constructor arguments in the object store and max_restarts > 0. If the "
             "arguments in the object store go out of scope or are lost, the actor restart will fail.",
             "Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task will be "
             "retried. Error: The actor is dead because it was killed by `ray.kill`."]
    assert printed(noise, "raylet") == []
    # Lines equal but for their numbers, from two trials and twice from one: all printed, none folded.
    epoch = "[train c1d2f_0000{}] epoch 1/6  lr {}e-03  train_loss 0.4976  val_weighted_log_loss 1.3196"
    lines = [epoch.format(0, 2.01), epoch.format(1, 1.05)]
    assert printed(lines[:1], 9848) + printed(lines[1:], 9880) + printed(lines[1:], 9880) == lines + lines[1:]
    other = ["WARNING: something else the raylet says"] * 2
    assert printed(other, "raylet") == other


def test_only_groups_of_ended_jobs_without_live_actors_count_as_orphaned():
    def group(job, state="CREATED", detached=False):
        return {"placement_group_id": f"pg-{job}-{state}-{detached}", "creator_job_id": job, "state": state,
                "is_detached": detached}

    groups = [group("08000000"), group("08000000", state="REMOVED"), group("08000000", detached=True),
              group("09000000"), group("01000000")]
    # 08 and 09 have ended; 09 still has a (detached) actor alive; 01 is running.
    orphans = orphaned_placement_groups(groups, dead_jobs={"08000000", "09000000"}, jobs_with_live_actors={"09000000"})
    assert [g["placement_group_id"] for g in orphans] == ["pg-08000000-CREATED-False"]


def test_removing_orphaned_placement_groups_keeps_the_running_jobs_own(ray_session):
    """On the session's real cluster: a placement group of this (running) job is not touched."""
    from ray.util.placement_group import placement_group, remove_placement_group

    mine = placement_group([{"CPU": 0.01}])
    ray_session.get(mine.ready(), timeout=60)
    try:
        assert remove_orphaned_placement_groups() == 0
        assert ray_session.util.placement_group_table(mine)["state"] == "CREATED"
    finally:
        remove_placement_group(mine)
