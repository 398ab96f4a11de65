"""cluster.yaml against Ray's own cluster-config schema; jobs/serve.yaml against Serve's config model."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    # What the design needs: a CPU-only head, autoscaling GPU and CPU workers, the Ray GPU image.
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"gpu_worker", "cpu_worker"} <= set(types)
    assert all(types[t]["min_workers"] < types[t]["max_workers"] for t in ("gpu_worker", "cpu_worker"))
    assert config["docker"]["image"].startswith("rayproject/ray:") and config["docker"]["image"].endswith("-gpu")


def test_cluster_schema_really_rejects_a_broken_config():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_serve_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "raysys.serve:app" and "checkpoint" in app.args
