"""How raysys starts or joins Ray, and what every process it starts gets: environment, log format and two fixes
to Ray Data: its start-up (`worker_setup`) and its idle scheduling loop (raysys/executor_idle.py, registered
through `process_env`).

Every entry point (CLI, demo, jobs, benchmarks, the test session) calls `init_ray`, so that a
captured log reads like a torchvision reference log: one line per event, no progress-bar
redraws or colour codes when stdout is not a terminal, each warning once.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Ray's lines that say nothing about the run, dropped from a driver's output:
# - the raylet's "N PYTHON worker processes have been started ... which is Kx the maximum expected startup
#   concurrency", which comes again at every two more workers (fractional CPUs start many, by design on small
#   machines): its first, at 4x, stays;
# - "Actor ... has constructor arguments in the object store and max_restarts > 0", from Train's and Ray Data's
#   own actors, once per trial;
# - Serve's "ServeController.graceful_shutdown failed ... will be retried" as Serve shuts down.
RAY_NOISE = (r"which is (?:[5-9]|\d{2,})x the maximum expected startup concurrency"
             r"|has constructor arguments in the object store and max_restarts > 0"
             r"|ServeController\.graceful_shutdown failed")


STARVATION_WARNING_S = 600  # Ray Data's warning about an operator without resources, after this long (process_env)
TRAIN_POLL_S = 0.2  # how often Train's controller looks at its workers (process_env)
CALLBACKS_ENV = "RAY_DATA_EXECUTION_CALLBACKS"  # Ray Data's registry of execution callbacks: "module.Class,..."
IDLE_WAIT = "raysys.executor_idle.IdleWait"  # stops an executor's scheduling loop from spinning (process_env)


@contextmanager
def env_default(name: str, value: str) -> Iterator[None]:
    """Environment variable `name` = `value` in this process for the block, unless the user set it (then theirs
    stays); removed again after. For Ray settings read from the environment of the process that starts something."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def apply_process_env() -> None:
    """process_env() into this process's environment; a variable the user set keeps its value (CALLBACKS_ENV
    gets raysys's callback added to the user's)."""
    for key, value in process_env().items():
        if key == CALLBACKS_ENV:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)


def interactive() -> bool:
    return sys.stdout.isatty()


def process_env() -> dict[str, str]:
    """Environment for this process and every Ray worker raysys starts (set before Ray Data is imported)."""
    env = {
        "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations otherwise asks PyPI for its version in every process
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # Train V2 sends a worker's print() both to a logger and stdout: twice
        "RAY_DATA_LOG_LEVEL": "WARNING",  # Ray Data's per-dataset INFO lines ("Starting execution of ...")
        # Tune's new output engine prints its experiment box and status tables even at verbose=0; with the
        # classic engine verbose=0 is silent, and raysys.tune.TrialLog writes one line per trial event.
        "RAY_AIR_NEW_OUTPUT": "0",
        # Train V2's controller looks at its workers every 2 s by default. It collects each `ray.train.report` on
        # that look, and a report waits for the one before to be collected: a sequence-stage epoch of ~0.1 s waited
        # 2 s for each (40 s of a 20-epoch stage, 5 s at 0.2 s, 2 cores). A run's start and end wait for a look
        # too: a 2-epoch CNN run took 27.6 s at 2 s, 23.6-25.0 s at 0.5 s. A lost worker is also seen sooner.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(TRAIN_POLL_S),
        # Ray Data divides each node's CPUs among the executions registered at once by integer division (its
        # autoscaling coordinator: 2 CPUs among three or more is 0 each), and an execution left with less than
        # one task's CPUs goes on with the one task an idle operator is always allowed. In the 2-core demo's two
        # concurrent trials (epochs of 100 s on a slower machine) Ray then warned after 60 s, once per epoch and
        # trial, that the job "may hang forever" while every epoch finished. One that runs nothing for 10
        # minutes is still named.
        "RAY_DATA_STARVATION_WARNING_DELAY_S": str(STARVATION_WARNING_S),
        # Ray Data's scheduling loop spins at up to a full core while a pipeline waits for a slower consumer
        # (raysys/executor_idle.py); in the 2-core demo the Tune stage's epochs took 1.3-1.5x as long. Added to
        # whatever callbacks the user registered there.
        CALLBACKS_ENV: ",".join(dict.fromkeys(filter(None, [*os.environ.get(CALLBACKS_ENV, "").split(","), IDLE_WAIT]))),
        # Ray folds log lines that differ only in numbers into "[repeated Nx across cluster]", so the epoch lines
        # of two trials would hide each other. Every line but RAY_NOISE matches the allow pattern, which Ray
        # prints as it comes, never folded; RAY_NOISE lines it drops.
        "RAY_DEDUP_LOGS": "1",
        "RAY_DEDUP_LOGS_ALLOW_REGEX": f"^(?!.*(?:{RAY_NOISE}))",
        "RAY_DEDUP_LOGS_SKIP_REGEX": RAY_NOISE,
    }
    if not interactive():
        env["RAY_TQDM"] = "0"  # no bars redrawn with \r and cursor-up codes: Ray Data logs progress at INFO instead
        env["RAY_COLOR_PREFIX"] = "0"  # "(RayTrainWorker pid=...)" prefixes without colour codes
    return env


class _PlainStream:
    """A non-interactive stdout/stderr without terminal codes: Ray colours some lines whatever the output is."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_ESCAPES.sub("", text.replace("\r\n", "\n")))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def plain_output() -> None:
    """For command-line entry points: line-buffered output, and no escape codes or redraws when captured."""
    sys.stdout.reconfigure(line_buffering=True)  # printed results and log lines stay in order in a captured log
    if not interactive() and not isinstance(sys.stdout, _PlainStream):
        sys.stdout, sys.stderr = _PlainStream(sys.stdout), _PlainStream(sys.stderr)


def _is_console(handler: logging.Handler) -> bool:
    """A handler that prints to this process's stdout/stderr (ours or one Ray added), not a test's capture."""
    stream = getattr(handler, "stream", None)
    return isinstance(handler, logging.StreamHandler) and (
        getattr(handler, "_raysys", False)
        or stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
        or getattr(stream, "_stream", None) in (sys.__stdout__, sys.__stderr__)
    )


def configure_logging(level: int = logging.INFO) -> None:
    """One line per event on stderr, `time LEVEL logger: message`, through one handler.

    Ray's own loggers are kept at WARNING and share the handler: ray.init and Ray's libraries add
    console handlers of their own, which would print lines in other formats or print them twice.
    """
    apply_process_env()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _is_console(h)]:
        root.removeHandler(handler)
    ours = logging.StreamHandler()
    ours._raysys = True
    ours.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(ours)
    root.setLevel(level)
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers = [ours]
    ray_logger.setLevel(logging.WARNING)
    ray_logger.propagate = False
    logging.captureWarnings(True)  # Python warnings become log records: once each, in the same format


def worker_setup() -> None:
    """What every process of a raysys job runs first: the driver (init_ray) and each Ray worker process (the job's
    runtime environment names this as its worker_process_setup_hook), where Train's split coordinators and Ray
    Data's other executors run."""
    _limits_from_the_first_reservation()


def _limits_from_the_first_reservation() -> None:
    """Ray Data executions start with resource limits of zero for their first second, so they run one task at a
    time: the limits come from the AutoscalingCoordinator's reservation, which the executor asks for without waiting
    and reads again only once a second (ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S). Measured on 2 cores (Ray
    2.60): a 1,950-image cache epoch ran its 8 read tasks one after another; the limits became 2 CPUs 1.04-1.10 s
    after an epoch began, and 40-90 ms after with this fix (3-10 ms after the executor's first look at them;
    benchmarks/execution_start.py). Until the first reservation has arrived (a real one always
    holds object store memory), the limits are read on every scheduling step; from then on Ray's own interval
    applies. A no-op where Ray Data lacks what it wraps."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    original = getattr(ResourceManager, "get_global_limits", None)
    if original is None or getattr(original, "raysys_fix", False):
        return

    @functools.wraps(original)
    def get_global_limits(self):
        limits = getattr(self, "_global_limits", None)
        if limits is not None and getattr(limits, "object_store_memory", None) == 0:
            self._global_limits_last_update_time = 0  # no reservation yet: ask again now
        return original(self)

    get_global_limits.raysys_fix = True
    ResourceManager.get_global_limits = get_global_limits


def init_ray(address: str | None = None, **kwargs) -> None:
    """Start a local Ray (address None) or join one ("auto", "ray://..."), unless this process already has.

    Worker processes get `process_env()` (or this process's own value of a variable) through the job's runtime
    environment and log at WARNING, so Ray's own per-task INFO lines stay in Ray's log files instead of the run's
    log; each runs `worker_setup` first, as this process does.
    """
    apply_process_env()  # before Ray Data is imported: it reads most of them once
    # A local Ray keeps enough idle worker processes for fractional-CPU tasks. Ray keeps about one per CPU
    # and ends the rest after a second idle, so bursts of 0.25-CPU decode tasks kept starting processes
    # that import raysys again, costing more than the decoding (1,054 slices: 84 img/s without, 399 img/s
    # with, 2 cores). A cluster started with `ray start` gets the same from cluster.yaml.
    os.environ.setdefault("RAY_num_workers_soft_limit", str(4 * (os.cpu_count() or 1)))
    import ray

    if not ray.is_initialized():
        runtime_env = kwargs.pop("runtime_env", None) or {}
        # Workers also drop DeprecationWarnings: Ray's libraries call Ray's own deprecated APIs (a note to Ray's
        # developers, printed once per worker process into the run's log).
        # A value the user set in this process's environment is kept (os.environ got the rest just above).
        workers = {**{key: os.environ[key] for key in process_env()}, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
        runtime_env = {"worker_process_setup_hook": f"{__name__}.worker_setup", **runtime_env,
                       "env_vars": {**workers, **runtime_env.get("env_vars", {})}}
        ray.init(address=address, runtime_env=runtime_env, logging_config=ray.LoggingConfig(log_level="WARNING"),
                 **kwargs)
    worker_setup()
    configure_logging()


def orphaned_placement_groups(groups: list[dict], dead_jobs: set[str], jobs_with_live_actors: set[str]) -> list[dict]:
    """The placement groups Ray should have removed with their job: created, not detached, made by a job that has
    ended and has no actor left alive (a detached actor keeps its job's groups). `groups`: the state API's
    placement groups as dicts (placement_group_id, creator_job_id, state, is_detached)."""
    return [g for g in groups if g["state"] == "CREATED" and not g["is_detached"]
            and g["creator_job_id"] in dead_jobs and g["creator_job_id"] not in jobs_with_live_actors]


def remove_orphaned_placement_groups() -> int:
    """Remove orphaned_placement_groups() from the cluster; returns how many.

    A driver killed while one of its Train runs starts a worker group can leave that group's placement group
    behind (Ray 2.60: created 0.2 s after the job had ended, in a test that kills a sweep's driver), holding its
    CPUs for good; a sweep relaunched to resume then waits forever for them. Called before a sweep resumes. Needs
    Ray's state API (the dashboard); without it nothing is removed."""
    import dataclasses

    import ray
    from ray._raylet import PlacementGroupID
    from ray.util import state
    from ray.util.placement_group import PlacementGroup

    try:
        groups = [dataclasses.asdict(g) for g in state.list_placement_groups(
            detail=True, filters=[("state", "=", "CREATED")], limit=10_000, raise_on_missing_output=False)]
        dead = {job["JobID"] for job in ray._private.state.jobs() if job["IsDead"]}
        alive = {a.job_id for a in state.list_actors(filters=[("state", "=", "ALIVE")], limit=10_000,
                                                     raise_on_missing_output=False)}
    except Exception as e:  # no dashboard, or a state API that moved: leave the cluster as it is
        logging.getLogger(__name__).debug("placement groups not checked: %s", e)
        return 0
    orphans = orphaned_placement_groups(groups, dead, alive)
    for g in orphans:
        ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(g["placement_group_id"])))
        held = [b.get("unit_resources") for b in g.get("bundles") or [] if isinstance(b, dict)]
        logging.getLogger(__name__).warning(
            "removed placement group %s (bundles %s) left by job %s, which has ended: a killed driver's run can leave "
            "one behind, holding those resources for good", g["placement_group_id"], held, g["creator_job_id"])
    return len(orphans)


def largest_node_cpus() -> float:
    """CPUs of the largest live node: the most one actor can hold."""
    import ray

    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)


def cpus_left(held: float, data_cpus: float, what: str) -> float:
    """CPUs the cluster has beyond `held` (what `what` takes: Train workers, an actor pool); warns when that
    leaves less than `data_cpus` for the Ray Data tasks that feed it, which would then wait for CPUs forever
    unless the cluster grows (an autoscaling cluster adds nodes; a laptop never does)."""
    import ray

    left = ray.cluster_resources().get("CPU", 0.0) - held
    if left < data_cpus:
        logging.getLogger(__name__).warning(
            "%s takes %g of the cluster's %g CPUs, leaving %g for the Ray Data tasks that feed it (each needs %g): "
            "nothing is decoded until the cluster has more CPUs; use fewer workers or fractional "
            "--cpus-per-worker", what, held, held + left, max(left, 0.0), data_cpus)
    return left
