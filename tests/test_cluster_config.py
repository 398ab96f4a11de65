"""cluster.yaml against Ray's own cluster-config schema and the closed-by-default design (token auth on every
node, a private dashboard, tokens made once and 0600); jobs/serve.yaml against Serve's config model."""

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def ray_start(commands: list[str]) -> tuple[dict[str, str], list[str]]:
    """The environment assignments and the arguments of the one `ray start` line among a node's start commands."""
    [line] = [c for c in commands if re.search(r"(^|\s)ray start(\s|$)", c)]
    words = shlex.split(line)
    at = words.index("ray")
    assert words[at + 1] == "start" and all(re.fullmatch(r"[A-Za-z_]\w*=.*", w) for w in words[:at]), line
    return dict(w.split("=", 1) for w in words[:at]), words[at + 2:]


def make_cluster_tokens(config: dict, home: Path) -> list[subprocess.CompletedProcess]:
    """Run cluster.yaml's head_setup_commands as the launcher does (one bash each), with `home` as $HOME."""
    env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return [subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
            for command in config["head_setup_commands"]]


def token_file(config: dict, home: Path) -> Path:
    """Where the nodes' `ray start` reads the cluster token, with `home` as $HOME."""
    env, _ = ray_start(config["head_start_ray_commands"])
    return Path(env["RAY_AUTH_TOKEN_PATH"].replace("$HOME", str(home)))


def load_cluster() -> dict:
    """cluster.yaml as the launcher reads it."""
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


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


def test_every_node_starts_ray_with_token_auth_and_the_dashboard_stays_private():
    config = load_cluster()
    head_env, head_args = ray_start(config["head_start_ray_commands"])
    worker_env, worker_args = ray_start(config["worker_start_ray_commands"])
    assert "--head" in head_args and any(a.startswith("--address=") for a in worker_args)
    for env in (head_env, worker_env):  # in 2.60 a worker turns auth on only when told, whatever the head does
        assert env.get("RAY_AUTH_MODE") == "token", env
        assert env.get("RAY_AUTH_TOKEN_PATH") == head_env["RAY_AUTH_TOKEN_PATH"]  # one token for the whole cluster
        assert "RAY_AUTH_TOKEN" not in env  # the secret itself is never in the config
    assert "--dashboard-host=127.0.0.1" in head_args  # the job API: through `ray dashboard cluster.yaml` only
    assert "0.0.0.0" not in " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    # Workers read the token where the head made it: inside a file mount, which the head syncs to every worker.
    path = head_env["RAY_AUTH_TOKEN_PATH"]
    assert path.startswith("$HOME/") and any(path.replace("$HOME", "~", 1).startswith(f"{mount}/")
                                             for mount in config["file_mounts"])
    # CLI shells on the nodes (`ray exec cluster.yaml 'ray status'`) use the same token.
    assert any(f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={path}" in c for c in config["setup_commands"])


def test_head_setup_makes_the_tokens_once_private_and_silently(tmp_path):
    config = load_cluster()
    ray_token = token_file(config, tmp_path)
    serve_example = re.search(r"^\s*#\s*token_file:\s*(\S+)", (ROOT / "jobs" / "serve.yaml").read_text(), re.M)
    serve_token = ray_token.parent / Path(serve_example.group(1)).name  # the file jobs/serve.yaml points at
    for run in make_cluster_tokens(config, tmp_path):
        assert run.returncode == 0 and run.stdout == run.stderr == "", run  # nothing printed into `ray up`'s log
    tokens = [ray_token.read_text().strip(), serve_token.read_text().strip()]
    assert all(re.fullmatch(r"[0-9a-f]{64}", t) for t in tokens) and tokens[0] != tokens[1]  # 256 bits each
    assert stat.S_IMODE(ray_token.parent.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in (ray_token, serve_token)} == {0o600}
    make_cluster_tokens(config, tmp_path)  # `ray up` again, or a restarted head: the same tokens
    assert [ray_token.read_text().strip(), serve_token.read_text().strip()] == tokens


def test_serve_yaml_token_file_example_is_a_valid_app_argument():
    from ray.serve.schema import ServeDeploySchema

    from raysys.config import ServeConfig, build_config

    text = (ROOT / "jobs" / "serve.yaml").read_text()
    example = re.search(r"^\s*#\s*(token_file:\s*\S+)", text, re.M).group(1)
    config = yaml.safe_load(text)
    args = config["applications"][0]["args"]
    assert "token_file" not in args and "runtime_env" not in config["applications"][0]  # no secret in the file
    args.update(yaml.safe_load(example))
    ServeDeploySchema.model_validate(config)
    cfg = build_config(ServeConfig, {k: v for k, v in args.items() if k != "checkpoint"}, "jobs/serve.yaml")
    assert cfg.token_file == "/home/ray/raysys/.cluster-secrets/serve_api_token"
