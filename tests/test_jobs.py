"""The real `ray job submit` CLI against a real `ray start --head` (its own ports and temp dir)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A Ray head started by the CLI; `--block` ties its processes to this Popen, so stopping it
    stops exactly this cluster (never `ray stop`, which would take the test session's Ray too)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    dashboard = _free_port()
    temp_dir = Path("/tmp") / f"raysys-head-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}", f"--dashboard-port={dashboard}",
           "--dashboard-host=127.0.0.1", f"--ray-client-server-port={_free_port()}", "--num-cpus=2",
           "--object-store-memory=500000000", f"--temp-dir={temp_dir}", "--include-dashboard=true",
           # Own ports for the agents too: the defaults (52365, ...) may belong to another local Ray.
           f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
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
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started ...
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_processes_mentioning(str(temp_dir))  # ... and anything of this head's that survived it


def _kill_processes_mentioning(marker: str) -> None:
    """SIGKILL every process whose command line names this head's temp dir (GCS, raylet, agents)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.mark.cluster
def test_train_smoke_job_succeeds_and_writes_a_checkpoint(head, tmp_path):
    address, env = head
    storage = tmp_path / "runs"
    job_id = f"raysys-smoke-{os.getpid()}"
    ray = str(BIN / "ray")
    command = [ray, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--submission-id", job_id,
               "--no-wait", "--", "python", "jobs/train.py", "--smoke-test", "--storage-path", str(storage),
               "--workers", "2"]
    for _ in range(30):  # the head's job agent can lag its dashboard by a few seconds
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stderr[-3000:]
    deadline, status = time.time() + 600, ""
    while time.time() < deadline:
        status = subprocess.run([ray, "job", "status", "--address", address, job_id], env=env, capture_output=True,
                                text=True, timeout=60).stdout
        if any(state in status for state in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = subprocess.run([ray, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=60).stdout
    assert "SUCCEEDED" in status, status + logs[-4000:]
    checkpoints = sorted((storage / "smoke").glob("checkpoint_*"))
    assert checkpoints and (checkpoints[-1] / "model.pt").is_file() and (checkpoints[-1] / "meta.json").is_file()
    assert (storage / "smoke" / "metrics.csv").is_file()
    assert "[train] epoch 2/2" in logs  # the per-epoch progress line reached the job's log
