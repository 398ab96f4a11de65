"""raysys.config: one frozen config per concern, paths made absolute once, bad values refused where they are given."""

import os

import pytest

from raysys.config import Config, InferenceConfig, ServeConfig, SweepConfig, build_config, from_dict, load_config


def test_local_paths_become_absolute_where_the_config_is_built_and_uris_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config().replace(**{"data.data": "scans/dicoms", "data.labels": "~/labels.csv",
                              "model.weights": "weights/w.pth", "train.storage_path": "runs",
                              "sweep.storage_path": "s3://bucket/sweeps"})
    assert cfg.data.data == os.path.join(str(tmp_path), "scans", "dicoms")
    assert cfg.data.labels == os.path.join(os.path.expanduser("~"), "labels.csv")
    assert cfg.model.weights == os.path.join(str(tmp_path), "weights", "w.pth")
    assert cfg.train.storage_path == os.path.join(str(tmp_path), "runs")
    assert cfg.sweep.storage_path == "s3://bucket/sweeps"
    assert Config().replace(**{"model.weights": "imagenet"}).model.weights == "imagenet"
    # MLflow: a folder and a relative SQLite file become absolute (Train workers run in their own folders)
    for uri, expected in [("mlruns", os.path.join(str(tmp_path), "mlruns")),
                          ("sqlite:///db/mlflow.db", "sqlite:///" + os.path.join(str(tmp_path), "db", "mlflow.db")),
                          ("sqlite:////srv/mlflow.db", "sqlite:////srv/mlflow.db"), ("http://127.0.0.1:5000", None)]:
        assert Config().replace(**{"train.mlflow_uri": uri}).train.mlflow_uri == (expected or uri)
    assert Config().data.labels == ""  # nothing given: nothing made up
    # A config rebuilt elsewhere (a Train worker, a Tune trial) keeps the paths of the place it was built.
    monkeypatch.chdir("/")
    assert from_dict(cfg.to_dict()) == cfg


def test_yaml_then_flags_and_unknown_keys_or_bad_types_are_errors(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  lr: 0.001\n  epochs: 3\nsweep:\n  num_samples: 2\n")
    cfg = load_config(tmp_path / "run.yaml", {"train.epochs": "5"})
    assert (cfg.train.lr, cfg.train.epochs, cfg.sweep.num_samples) == (0.001, 5, 2)
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(None, {"train.learning_rate": "1"})
    with pytest.raises(ValueError, match="train.epochs: expected int"):
        load_config(None, {"train.epochs": "many"})


def test_configuration_errors_are_caught_before_anything_runs():
    with pytest.raises(ValueError, match="data.seed must be >= 0"):
        Config().replace(**{"data.seed": -1})
    with pytest.raises(ValueError, match="aux_logits needs data.image_size >= 299"):
        Config().replace(**{"model.aux_logits": True, "data.image_size": 256})
    with pytest.raises(ValueError, match="lr_min"):
        SweepConfig(lr_min=1e-2, lr_max=1e-3)
    with pytest.raises(ValueError, match="tta"):
        InferenceConfig(tta="vflip")
    with pytest.raises(ValueError, match="train.compile must be one of off, default, reduce-overhead"):
        Config().replace(**{"train.compile": "inductor"})  # a backend's name, not one of torch.compile's modes


def test_standalone_configs_take_strings_from_yaml_and_the_cli():
    serve = build_config(ServeConfig, {"max_batch_size": "8", "batch_wait_ms": "2.5"}, "serve")
    assert (serve.max_batch_size, serve.batch_wait_ms, serve.port) == (8, 2.5, ServeConfig().port)
    with pytest.raises(ValueError, match="unknown keys"):
        build_config(ServeConfig, {"checkpoint": "x"}, "serve")
