"""Several Ray nodes in this one machine (Ray's own `ray.cluster_utils.Cluster`): training, the header scan and
serving each lose a worker node mid-run and carry on.

One cluster for the module: a head with no CPUs (it runs the driver and the 0-CPU actors: Train's controller,
Ray Data's coordinators, Serve's controller and proxy, raysys's Serve Gateway) and two worker nodes of NODE_CPUS
logical CPUs each, told apart by a custom resource of their own name. Logical CPUs are scheduling labels: both
worker nodes share this machine's cores. A node is lost the hard way (every process SIGKILLed at once, as in a
crash), so Ray learns of it from missed health checks. The cluster keeps its files, and its `ray_current_cluster`
address file, in a temp dir of its own, so that no other Ray on the machine connects to it, and is shut down before
the suite's shared Ray starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import requests
import torch

from raysys import data as rdata
from raysys.config import Config, ServeConfig
from raysys.labels import LABELS
from raysys.model import build_model, load_checkpoint, read_meta, save_checkpoint
from raysys.synthetic import PhantomConfig, write_dataset
from raysys.testing import free_port, small_phantom, wait_healthy

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NODE_CPUS = 2  # logical CPUs per worker node
WORKER_NODES = ("node_a", "node_b")  # each node's custom resource, {name: 1}
SIZE = 80


@dataclass
class MultiNode:
    """The running cluster: add and remove worker nodes by name, ask the state API where things run."""

    cluster: object  # ray.cluster_utils.Cluster
    dashboard: str  # http://127.0.0.1:PORT, the state API's address (never auto-detected: other Rays may run here)
    nodes: dict = field(default_factory=dict)  # name -> ray._private.node.Node

    def add(self, name: str) -> str:
        """Start worker node `name` (again); its node id."""
        self.nodes[name] = self.cluster.add_node(num_cpus=NODE_CPUS, resources={name: 1})
        return self.node_id(name)

    def remove(self, name: str) -> None:
        """SIGKILL every process of node `name` at once: a node that crashes or is taken away.

        Ray's `remove_node` kills the node's own daemons (raylet, agents) but not the workers its raylet started:
        those notice the raylet's end a moment later and exit themselves, time in which a Serve replica can finish
        the requests it holds. A crashed machine's workers go with it, so they are killed first, in the same
        instant.
        """
        node = self.nodes.pop(name)
        raylet = node.all_processes["raylet"][0].process.pid
        for pid in _descendants(raylet):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # exited meanwhile
                pass
        self.cluster.remove_node(node, allow_graceful=False)

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def alive_actors(self, class_name: str) -> list:
        from ray.util.state import list_actors

        return list_actors(address=self.dashboard, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
                           limit=1000, raise_on_missing_output=False)


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, their children, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # exited meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from raysys.runtime import init_ray

    temp = Path(f"/tmp/raysys-mn-{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as env:
        # Ray's default temp dir follows RAY_TMPDIR; Cluster writes `ray_current_cluster` there, the file a plain
        # `ray.init()` anywhere on the machine would otherwise connect to. RAY_ADDRESS points this driver's and its
        # workers' auto-detecting calls (Train's controller asks the state API about its actors) at this cluster.
        env.setenv("RAY_TMPDIR", str(temp))
        # Serve's router asks each replica for its queue length and passes over one that does not answer within
        # 0.1 s. Two replicas and the Gateway on 2 loaded cores missed that for seconds, so that every request of
        # the node-loss test went to the other replica and none was in flight on the one lost. Every process of
        # this cluster inherits the longer wait (Serve's own ceiling for the probe).
        env.setenv("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
        head = Cluster()
        try:
            head.add_node(num_cpus=0, include_dashboard=True, dashboard_port=free_port(),
                          object_store_memory=200 * 2**20)
            env.setenv("RAY_ADDRESS", head.address)
            multi = MultiNode(head, f"http://{head.webui_url}")
            init_ray(address=head.address, runtime_env={"env_vars": {"RAY_ADDRESS": head.address}})
            yield multi
        finally:
            try:
                for _ in range(3):  # a failed test's background thread may still be inside Ray and connect again
                    ray.shutdown()
                    try:
                        head.shutdown()
                        break
                    except ValueError:  # "Removing a node that is connected to this Ray client": retry
                        continue
            finally:
                shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def multinode(cluster):
    """The cluster with both worker nodes up (a test that lost one and failed before bringing it back leaves it
    out)."""
    for name in WORKER_NODES:
        if name not in cluster.nodes:
            cluster.add(name)
    return cluster


def _wait(what: str, check, timeout_s: float, every_s: float = 0.5):
    """Poll `check()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


# --- Ray Train ----------------------------------------------------------------------------------------------------


def _checkpoint_epochs(run_dir: Path) -> dict[int, Path]:
    """{epoch: checkpoint dir} of the complete checkpoints in a run folder (one being written is skipped)."""
    found = {}
    for path in run_dir.glob("checkpoint_*"):
        try:
            found[read_meta(path)["epoch"]] = path
        except (OSError, ValueError, KeyError):
            pass
    return found


def _registered_epochs(run_dir: Path) -> list[int]:
    """Epochs whose checkpoints Train's controller has registered (its snapshot file). A checkpoint folder is
    resumable only from then on, up to one health-check interval (2 s) after rank 0 wrote it: a node lost in
    between restarts the run from the checkpoint before."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(c["metrics"]["epoch"] for c in snapshot["checkpoint_results"])


def test_training_on_two_nodes_resumes_after_losing_one(multinode, tmp_path):
    from ray.util.state import list_placement_groups

    from raysys.train import fit

    phantom = tmp_path / "phantom"
    small_phantom(phantom, seed=5)
    cfg = Config().replace(**{
        "data.data": str(phantom / "dicoms"), "data.labels": str(phantom / "labels.csv"),
        "data.image_size": SIZE, "data.val_fraction": 0.3, "data.seed": 1, "model.weights": "none",
        "train.epochs": 2, "train.batch_size": 4, "train.workers": 2, "train.max_steps_per_epoch": 3,
        # 1.5 of a node's 2 logical CPUs: one worker fits a node (as one GPU worker fits a one-GPU node), so the two
        # workers land on the two nodes, and the 0.5 CPU left on each node runs Ray Data's 0.25-CPU decode tasks.
        "train.cpus_per_worker": 1.5, "train.max_failures": 1,
        "train.storage_path": str(tmp_path / "runs"), "train.name": "mn",
    })
    run_dir = tmp_path / "runs" / "mn"
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fit(cfg)
        except BaseException as e:  # re-raised below
            outcome["error"] = e

    trainer = threading.Thread(target=run, daemon=True)
    began = time.monotonic()
    trainer.start()

    def two_workers() -> set | None:
        assert trainer.is_alive(), outcome.get("error")
        nodes = {a.node_id for a in multinode.alive_actors("RayTrainWorker")}
        return nodes if len(nodes) == 2 else None

    assert _wait("two Train workers", two_workers, 240) == {multinode.node_id(n) for n in WORKER_NODES}
    _wait("epoch 1's checkpoint registered", lambda: trainer.is_alive() and 1 in _registered_epochs(run_dir), 240, 0.1)
    assert 2 not in _checkpoint_epochs(run_dir)  # epoch 2 is under way: its checkpoint is not written yet
    lost_at = time.monotonic()
    multinode.remove("node_b")

    def waiting_for_capacity():  # the worker group is gone and its successor's placement group waits for a node
        pending = list_placement_groups(address=multinode.dashboard, filters=[("state", "=", "PENDING")],
                                        raise_on_missing_output=False)
        return pending and not multinode.alive_actors("RayTrainWorker")

    _wait("Train waiting for capacity", waiting_for_capacity, 120)
    noticed = time.monotonic() - lost_at
    assert trainer.is_alive(), outcome.get("error")
    back_at = time.monotonic()
    new_b = multinode.add("node_b")
    assert _wait("two Train workers again", two_workers, 240) == {multinode.node_id("node_a"), new_b}
    trainer.join(timeout=300)
    assert not trainer.is_alive(), "fit did not finish within 300 s of the node's return"
    if "error" in outcome:
        raise outcome["error"]
    print(f"\n[multinode train] {noticed:.1f}s from the node's loss to a worker group waiting for capacity; "
          f"{time.monotonic() - back_at:.1f}s from the node's return to the end of fit; whole run "
          f"{time.monotonic() - began:.1f}s")

    history = pd.read_csv(run_dir / "metrics.csv")
    assert list(history["epoch"]) == [1, 2]  # no epoch lost, none repeated
    assert list(history["start_epoch"]) == [1, 2]  # epoch 2 was run by the attempt that resumed after epoch 1
    assert list(outcome["result"].history["epoch"]) == [1, 2]
    loaded = load_checkpoint(_checkpoint_epochs(run_dir)[2])
    assert loaded.meta["epoch"] == 2 and loaded.meta["image_size"] == SIZE
    with torch.no_grad():
        out = loaded.model.eval()(torch.rand(1, 3, SIZE, SIZE))
    assert out.shape == (1, len(LABELS)) and torch.isfinite(out).all()


# --- Ray Data -----------------------------------------------------------------------------------------------------


def _decode_attempts(multinode) -> dict[tuple[str, int], tuple[str, str]]:
    """{(task id, attempt): (node id, state)} of every Ray Data read+decode task attempt so far."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=multinode.dashboard, limit=10000, raise_on_missing_output=False)
    return {(t.task_id, t.attempt_number): (t.node_id, t.state) for t in tasks if t.name.startswith("ReadDICOM")}


def _covered(found: rdata.Scan, run_dir: Path) -> tuple[set, set]:
    """(paths in the index, paths in errors.csv as written)."""
    errors = pd.read_csv(run_dir / "errors.csv")
    assert len(errors) == len(found.errors)
    return set(found.index["path"]), set(errors["path"])


def test_scan_decodes_on_two_nodes_and_survives_losing_one(multinode, tmp_path, monkeypatch):
    write_dataset(tmp_path / "phantom", PhantomConfig(studies=24, slices_per_study=(10, 16), size=64, seed=3,
                                                      quirks=True))
    dicoms = tmp_path / "phantom" / "dicoms"
    on_disk = {str(p) for p in dicoms.glob("*.dcm")}
    assert len(on_disk) > 200

    first = rdata.scan(str(dicoms), training=False, max_error_fraction=1.0, run_dir=str(tmp_path / "run1"))
    index, errors = _covered(first, tmp_path / "run1")
    assert index | errors == on_disk and not index & errors and errors  # the truncated quirk files are errors

    def finished_on():
        return {node for node, state in _decode_attempts(multinode).values() if state == "FINISHED"}

    both = {multinode.node_id(n) for n in WORKER_NODES}
    _wait("decode tasks finished on both nodes", lambda: both <= finished_on(), 30)  # task events lag up to 1 s

    # Second scan: node_b goes as soon as the first batch of results reaches the driver (the progress line, logged
    # for every batch here), while the other files are still being read.
    before = set(_decode_attempts(multinode))
    monkeypatch.setattr(rdata, "PROGRESS_EVERY_S", 0.0)
    lost = {}

    class RemoveNodeOnFirstBatch(logging.Handler):
        def emit(self, record):
            if "files so far" in record.getMessage() and not lost:
                lost["files_so_far"] = record.args[1]
                multinode.remove("node_b")
                lost["at"] = time.monotonic()

    handler = RemoveNodeOnFirstBatch()
    logging.getLogger("raysys.data").addHandler(handler)
    began = time.monotonic()
    try:
        second = rdata.scan(str(dicoms), training=False, max_error_fraction=1.0, run_dir=str(tmp_path / "run2"))
    finally:
        logging.getLogger("raysys.data").removeHandler(handler)
    ended = time.monotonic()
    assert lost and lost["files_so_far"] < len(on_disk)  # the node went while files were still to come
    index, errors = _covered(second, tmp_path / "run2")
    assert index | errors == on_disk and not index & errors  # every file decoded or listed, none missing
    assert second.total == len(on_disk)  # and none twice
    assert second.errors.set_index("path")["reason"].to_dict() == first.errors.set_index("path")["reason"].to_dict()

    # Where the second scan's tasks ran (task events reach the state API once a second; those of tasks on the lost
    # node stop where it died).
    time.sleep(2)
    attempts = [(node, attempt) for (task, attempt), (node, _) in _decode_attempts(multinode).items()
                if task not in {t for t, _ in before}]
    names = {multinode.node_id("node_a"): "node_a"}
    first_tries = pd.Series([names.get(n, "node_b") for n, a in attempts if a == 0]).value_counts().to_dict()
    retries = pd.Series([names.get(n, "node_b") for n, a in attempts if a > 0]).value_counts().to_dict()
    print(f"\n[multinode scan] node_b lost after {lost['files_so_far']} of {len(on_disk)} files had come back; the "
          f"scan finished {ended - lost['at']:.1f}s later ({ended - began:.1f}s in all); decode task attempts "
          f"seen by the state API: first tries {first_tries}, retries {retries}")


# --- Ray Serve ----------------------------------------------------------------------------------------------------


REQUESTS, CONCURRENCY, TIMEOUT_S = 400, 8, 30
# The served model's input: large enough that a replica spends most of the load on batches, so that the node loss
# catches requests in flight on it. At SIZE, 2 of 4 runs of this module (after its Train and scan tests) caught none
# in 400 requests; at 192 px, 3 of 3 runs caught some.
SERVE_SIZE = 192
REPLICA = "ServeReplica:raysys:HemorrhageService"  # the model replicas' actor class
GATEWAY = "ServeReplica:raysys:Gateway"  # the HTTP ingress's


def test_serve_replicas_on_two_nodes_survive_losing_one(multinode, tmp_path):
    from ray import serve

    from raysys.serve import RETRIED_HEADER, build_app

    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "best", build_model(image_size=SERVE_SIZE),
                                 config=Config().replace(**{"data.image_size": SERVE_SIZE}).to_dict(), epoch=1,
                                 metrics={"val_weighted_log_loss": 0.5})
    frame = write_dataset(tmp_path / "phantom", PhantomConfig(studies=1, slices_per_study=2, size=64, seed=4))
    body = Path(frame["path"].iloc[0]).read_bytes()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # One proxy, on the head: per-node proxies would all try to bind this machine's one port.
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    try:
        serve.run(build_app(str(checkpoint), ServeConfig(replicas=2, cpus_per_replica=1, max_batch_size=8)),
                  name="raysys", route_prefix="/", blocking=False)
        wait_healthy(url, timeout_s=240)
        replicas = multinode.alive_actors(REPLICA)
        # Serve schedules replicas with Ray's SPREAD strategy: one on each worker node.
        assert {a.node_id for a in replicas} == {multinode.node_id(n) for n in WORKER_NODES}
        # The Gateway that relays requests to them runs on the head, which no node loss takes.
        assert [a.node_id for a in multinode.alive_actors(GATEWAY)] == [multinode.cluster.head_node.node_id]
        first_replicas = {a.actor_id for a in replicas}

        def post(i):
            began = time.monotonic()
            try:
                r = requests.post(f"{url}/v1/predict", data=body, headers={"Content-Type": "application/dicom"},
                                  timeout=TIMEOUT_S)
                status, text, retried = r.status_code, r.text, r.headers.get(RETRIED_HEADER) == "1"
            except requests.RequestException as e:
                status, text, retried = type(e).__name__, str(e), False
            return {"i": i, "began": began, "ended": time.monotonic(), "status": status, "text": text,
                    "retried": retried}

        def recovered():
            """Two replicas running, one of them started after the loss."""
            app = serve.status().applications.get("raysys")
            deployment = app and app.deployments.get("HemorrhageService")
            if not (deployment and deployment.status == "HEALTHY" and deployment.replica_states.get("RUNNING") == 2):
                return False
            alive = {a.actor_id for a in multinode.alive_actors(REPLICA)}
            return len(alive) == 2 and alive != first_replicas

        kill: dict = {}
        done: list = []

        def kill_half_way():
            _wait("half the requests answered", lambda: len(done) >= REQUESTS // 2, 600, 0.02)
            kill["began"] = time.monotonic()
            multinode.remove("node_b")
            kill["ended"] = time.monotonic()
            _wait("two running replicas again", recovered, 240, 0.25)
            kill["recovered"] = time.monotonic()

        killer = threading.Thread(target=kill_half_way, daemon=True)
        killer.start()
        began = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            for outcome in pool.map(post, range(REQUESTS)):  # in request order: the killer counts them
                done.append(outcome)
        load_s = time.monotonic() - began
        killer.join(timeout=300)
        assert "recovered" in kill, "Serve did not get back to two running replicas"
        with ThreadPoolExecutor(CONCURRENCY) as pool:  # after recovery every request succeeds
            after = list(pool.map(post, range(REQUESTS, REQUESTS + 4 * CONCURRENCY)))

        outcomes = pd.DataFrame(done + after)
        failed = outcomes[outcomes["status"] != 200]
        print(f"\n[multinode serve] {len(outcomes)} requests ({REQUESTS} in {load_s:.1f}s at concurrency "
              f"{CONCURRENCY}, then {len(after)} after recovery): {int((outcomes['status'] == 200).sum())} answered "
              f"200 ({int(outcomes['retried'].sum())} of them on a second replica), failures "
              f"{failed['status'].value_counts().to_dict()} with bodies "
              f"{failed['text'].str[:60].value_counts().to_dict()}; two replicas running again "
              f"{kill['recovered'] - kill['ended']:.1f}s after the loss; slowest request "
              f"{(outcomes['ended'] - outcomes['began']).max():.1f}s")
        # Nothing hung, timed out or was reset: a request either succeeded (in flight on the lost replica, it was
        # retried on the other) or got raysys's JSON 503 (the retry was lost too).
        assert set(map(str, failed["status"])) <= {"503"}
        # Requests were in flight on the lost replica, and the Gateway took them elsewhere.
        assert outcomes["retried"].sum() + len(failed) > 0
        assert all("error" in json.loads(text) for text in failed["text"])
        # Failures only among requests in flight when the node went (or sent to its replica before the proxy knew),
        # none after Serve's recovery.
        assert (failed["began"] < kill["recovered"]).all() and (failed["ended"] > kill["began"]).all()
        assert (outcomes.loc[outcomes["began"] > kill["recovered"], "status"] == 200).all()
        assert len(multinode.alive_actors(REPLICA)) == 2
    finally:
        serve.shutdown()
