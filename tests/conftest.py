"""Shared fixtures: one real local Ray (2 CPUs) per test session, phantom data on disk."""

import os

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def pytest_collection_modifyitems(items):
    """Tests that start their own Ray head run first, so that two local clusters never share the 2 cores."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from raysys.runtime import init_ray

    # The dashboard stays on: Train V2 cleans up the placement groups of stopped runs through the state API.
    init_ray(num_cpus=2, log_to_driver=False, object_store_memory=1_500_000_000)
    yield ray
    ray.shutdown()
