"""Shared fixtures: one real local Ray (2 CPUs) per test session, phantom data on disk."""

import logging
import os

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Data's usage poller, a daemon thread in this process, logs a DEBUG record with a traceback every 10 s while no
# Prometheus answers. pytest's log capture takes Ray's DEBUG records, and one that arrived after pytest closed its
# streams printed "--- Logging error ---" and the traceback after the suite's summary.
logging.getLogger("ray.data._internal.usage").setLevel(logging.INFO)


def pytest_collection_modifyitems(items):
    """Tests that start their own Ray head run first, so that two local clusters never share the 2 cores."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's) on 127.0.0.1 for the whole session, with a bucket `raysys-test`.

    Started before the session's Ray, so every Ray worker inherits the AWS_* variables that point pyarrow (and with
    it Ray Data, Ray Train and raysys.storage) and boto3 at it."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import requests

    from raysys.testing import free_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(url, timeout=1)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto_server did not start on {url}") from None
            time.sleep(0.2)
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    import boto3

    boto3.client("s3").create_bucket(Bucket="raysys-test")
    yield url
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    import ray

    from raysys.runtime import init_ray

    # The dashboard stays on: Train V2 cleans up the placement groups of stopped runs through the state API.
    # address "local": always a new cluster of our own, never one a `ray start` left in /tmp/ray/ray_current_cluster.
    init_ray("local", num_cpus=2, log_to_driver=False, object_store_memory=1_500_000_000)
    yield ray
    ray.shutdown()
