"""The real `ray job submit` CLI against a real `ray start --head` (its own ports and temp dir)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

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
           "--object-store-memory=500000000", f"--temp-dir={temp_dir}", "--include-dashboard=true"]
    proc = subprocess.Popen(cmd, env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (tmp_path / "head.log").read_text()
            time.sleep(1)
        else:
            raise AssertionError("head did not come up:\n" + (tmp_path / "head.log").read_text())
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_train_smoke_job_succeeds_and_writes_a_checkpoint(head, tmp_path):
    address, env = head
    storage = tmp_path / "runs"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         "python", "jobs/train.py", "--smoke-test", "--storage-path", str(storage), "--workers", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    log = submit.stdout[-4000:] + submit.stderr[-2000:]
    assert submit.returncode == 0, log
    assert "SUCCEEDED" in submit.stdout, log
    checkpoints = sorted((storage / "smoke").glob("checkpoint_*"))
    assert checkpoints and (checkpoints[-1] / "model.pt").is_file() and (checkpoints[-1] / "meta.json").is_file()
    assert (storage / "smoke" / "metrics.csv").is_file()
