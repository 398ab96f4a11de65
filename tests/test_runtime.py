"""raysys.runtime: what every process of a raysys job gets from init_ray, on the session's real local Ray."""

import os
import time

import numpy as np

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
