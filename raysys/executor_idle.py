"""A Ray Data execution callback that stops the streaming executor's scheduling loop from spinning while it waits.

Ray Data's StreamingExecutor (Ray 2.60) runs its scheduling loop in a thread of the process that iterates the
data (a Train split coordinator actor, a Train worker, a driver). Each step waits in `ray.wait` for up to 0.1 s
for a running task to have output. But a task whose output the executor may not take yet (output backpressure:
the consumer is behind, or the execution's share of the cluster is used up) counts as ready, so `ray.wait`
returns at once, the step takes nothing and dispatches nothing, and the loop runs again as fast as Python goes.
That is the normal state of a pipeline faster than its trainer. Measured on 2 cores with the demo's epoch
pipelines (py-spy, top): split coordinators at 35-70% of a core for whole epochs, beside trainers that had one
core each to begin with (benchmarks/executor_idle.py measures it).

`IdleWait.on_execution_step` runs after every step; after a step that changed nothing (no task submitted or
finished, no output made or taken) and came within IDLE_WAIT_S of the one before, it sleeps IDLE_WAIT_S: the
interval at which Ray Data's own consumer polls an empty queue (OpState.get_output_blocking sleeps 10 ms). A
blocked loop then looks 100 times a second instead of thousands, and reacts at most 10 ms later to a consumer
that frees room. raysys.runtime.process_env names the class in RAY_DATA_EXECUTION_CALLBACKS, Ray Data's registry
of execution callbacks, for the driver and every worker; on a Ray Data without what it reads, it does nothing.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_WAIT_S = 0.01
COUNTERS = ("num_tasks_submitted", "num_tasks_finished", "num_task_outputs_generated", "num_outputs_taken",
            "num_external_outqueue_blocks")  # per operator; a step that changes none made no progress


def progress(executor) -> tuple | None:
    """Every operator's COUNTERS, or None where this Ray Data has not got them."""
    try:
        return tuple(getattr(op.metrics, name) for op in executor._topology for name in COUNTERS)
    except (AttributeError, TypeError):
        return None


class IdleWait(ExecutionCallback):
    """Sleep IDLE_WAIT_S after a scheduling step that changed nothing and followed the last one within that time."""

    def __init__(self) -> None:
        self._seen: tuple | None = None
        self._at = -float("inf")

    def idle(self, executor, now: float) -> bool:
        """Whether the step that just ran at `now` (perf_counter seconds) changed nothing and came right after the
        last one: the loop is spinning."""
        seen = progress(executor)
        spinning = seen is not None and seen == self._seen and now - self._at < IDLE_WAIT_S
        self._seen, self._at = seen, now
        return spinning

    def on_execution_step(self, executor) -> None:
        if self.idle(executor, time.perf_counter()):
            time.sleep(IDLE_WAIT_S)
            self._at = time.perf_counter()
