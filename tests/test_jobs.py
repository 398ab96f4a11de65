"""The real `ray job submit` and `serve deploy` CLIs against a real `ray start --head` (its own ports and
temp dir), started once for this module and always stopped."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from test_cluster_config import load_cluster, make_cluster_tokens, ray_start

from raysys.config import Config
from raysys.engine import infer
from raysys.labels import LABELS
from raysys.model import read_meta, save_checkpoint
from raysys.presets import dicom_to_image
from raysys.synthetic import PhantomConfig, write_dataset
from raysys.testing import PROCESS_ATOL, free_port, untrained_cnn

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head started by the CLI; `--block` ties its processes to this Popen, so stopping it
    stops exactly this cluster (never `ray stop`, which would take the test session's Ray too)."""
    tmp_path = tmp_path_factory.mktemp("head")
    # cluster.yaml's own auth: its head_setup_commands make the token (in a $HOME of this head's own, so nothing
    # is read from or written to ~/.ray), and RAY_AUTH_* and --dashboard-host come from its `ray start --head`
    # line; the head, its jobs and every CLI call below share them through the environment. Ports are free
    # ones instead of the shipped 6379/8265, which may belong to another local Ray.
    config, home = load_cluster(), tmp_path / "home"
    for run in make_cluster_tokens(config, home):
        assert run.returncode == 0, run.stderr
    shipped_env, shipped_args = ray_start(config["head_start_ray_commands"])
    auth = {k: v.replace("$HOME", str(home)) for k, v in shipped_env.items() if k.startswith("RAY_AUTH_")}
    [dashboard_host] = [a.split("=", 1)[1] for a in shipped_args if a.startswith("--dashboard-host=")]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **auth}
    env.pop("RAY_AUTH_TOKEN", None)  # it would outrank the token file
    dashboard = free_port()
    temp_dir = Path("/tmp") / f"raysys-head-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", f"--dashboard-port={dashboard}",
           f"--dashboard-host={dashboard_host}", f"--ray-client-server-port={free_port()}", "--num-cpus=2",
           "--object-store-memory=500000000", f"--temp-dir={temp_dir}", "--include-dashboard=true",
           # Own ports for the agents too: the defaults (52365, ...) may belong to another local Ray.
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # ready when the job agent answers the real CLI
            ready = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True, timeout=60)
            if ready.returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "head.log").read_text()
            time.sleep(2)
        else:
            raise AssertionError(f"head did not come up: {ready.stderr[-2000:]}")
        yield address, env
    finally:
        tree = _descendants(proc.pid)  # GCS, raylet, agents and workers: worker names no longer show the temp dir
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started ...
            proc.wait(timeout=10)  # a graceful stop can take half a minute; what is left gets SIGKILL
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had already stopped (a head that failed to start)
            pass
        for pid in tree | _descendants(proc.pid):  # ... and whatever of this head's survived it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _descendants(root: int) -> set[int]:
    """Every live process below `root`, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _own_address() -> str | None:
    """This machine's non-loopback IPv4 address (the one its default route leaves from), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: picks the interface, sends nothing
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") else ip


@pytest.mark.cluster
def test_job_api_is_closed_without_the_token(head):
    """A head started the way cluster.yaml starts one: the job API (which runs code) answers only requests that
    carry the cluster token, and only on loopback."""
    address, env = head
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    jobs, sneaky = f"{address}/api/jobs/", f"echo not-authorized-{os.getpid()}"
    assert requests.get(jobs, timeout=10).status_code == 401  # no token
    assert requests.post(jobs, json={"entrypoint": sneaky}, timeout=10).status_code == 401
    assert requests.get(jobs, headers={"Authorization": f"Bearer {'0' * 64}"}, timeout=10).status_code == 403
    listed = requests.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert listed.status_code == 200, listed.text
    assert all(job["entrypoint"] != sneaky for job in listed.json())  # the refused submission never ran
    ip = _own_address()
    if ip is not None:  # the dashboard listens on 127.0.0.1 only: the machine's own address refuses
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ip, int(address.rsplit(":", 1)[1])), timeout=5).close()


@pytest.mark.cluster
def test_train_smoke_job_succeeds_and_writes_a_checkpoint(head, tmp_path):
    address, env = head
    storage = tmp_path / "runs"
    job_id = f"raysys-smoke-{os.getpid()}"
    ray = str(BIN / "ray")
    command = [ray, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--submission-id", job_id,
               "--", "python", "jobs/train.py", "--smoke-test", "--storage-path", str(storage),
               "--workers", "2"]
    for _ in range(30):  # the head's job agent can lag its dashboard by a few seconds
        # Without --no-wait the CLI tails the job's logs until it ends and exits 1 when it failed.
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0 and f"Job '{job_id}' succeeded" in out, out[-4000:]
    # A run of its own (smoke-<UTC time>): under a name used before, the job would resume that run, and a finished
    # one would train nothing and still succeed.
    (run,) = [p for p in storage.glob("smoke-*") if p.name != "smoke-data"]
    assert re.fullmatch(r"smoke-\d{8}-\d{6}", run.name), run
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and (checkpoints[-1] / "model.pt").is_file() and (checkpoints[-1] / "meta.json").is_file()
    assert (run / "metrics.csv").is_file()
    # The data is where every node of a cluster reads the run, not in the driver node's temp dir.
    assert (storage / "smoke-data" / "labels.csv").is_file() and len(list((storage / "smoke-data" / "dicoms").glob("*.dcm"))) > 10
    assert f"[train {run.name}] epoch 2/2" in submit.stdout  # the per-epoch progress line reached the job's log


@pytest.mark.cluster
def test_serve_yaml_deploys_on_the_head_and_answers_http(head, tmp_path):
    """jobs/serve.yaml as shipped, with only the checkpoint and the HTTP port filled in."""
    address, env = head
    frame = write_dataset(tmp_path / "phantom", PhantomConfig(studies=1, slices_per_study=2, size=128, seed=4))
    model = untrained_cnn(frame["path"], 80)  # probabilities away from 0 and 1: a wrong input would show
    checkpoint = save_checkpoint(tmp_path / "best", model, config=Config().replace(**{"data.image_size": 80}).to_dict(),
                                 epoch=1, metrics={"val_weighted_log_loss": 0.5})
    config = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["checkpoint"] = str(checkpoint)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    serve_cli = str(BIN / "serve")
    deploy = subprocess.run([serve_cli, "deploy", str(tmp_path / "serve.yaml"), "--address", address], env=env,
                            capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    try:
        deadline, app = time.time() + 180, {}
        while time.time() < deadline:
            status = subprocess.run([serve_cli, "status", "--address", address], env=env, capture_output=True,
                                    text=True, timeout=60)
            app = (yaml.safe_load(status.stdout) or {}).get("applications", {}).get("raysys", {})
            if app.get("status") in ("RUNNING", "DEPLOY_FAILED"):
                break
            time.sleep(2)
        assert app.get("status") == "RUNNING", app

        body = Path(frame["path"].iloc[0]).read_bytes()
        reply = requests.post(f"http://127.0.0.1:{port}/v1/predict", data=body,
                              headers={"Content-Type": "application/dicom"}, timeout=60)
        assert reply.status_code == 200, reply.text
        image, meta = dicom_to_image(body, read_meta(checkpoint)["windows"], 80)
        expected = infer(model, image[None], torch.device("cpu"))[0]
        answer = reply.json()
        assert answer["image_id"] == meta.image_id
        assert np.allclose([answer["probabilities"][name] for name in LABELS], expected, atol=PROCESS_ATOL)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        subprocess.run([serve_cli, "shutdown", "-y", "--address", address], env=env, capture_output=True, timeout=120)
