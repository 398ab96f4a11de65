"""Object storage for real: a cache, runs and a served checkpoint in an S3 bucket on a real S3-compatible server
(moto's, on 127.0.0.1; see the s3_endpoint fixture), through the `raysys` CLI as a user runs it. A sweep killed
and resumed in the bucket: tests/test_tune.py."""

import io
import json
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from test_cli import TINY, _run

from raysys import data as rdata
from raysys import storage
from raysys.config import DataConfig
from raysys.engine import infer
from raysys.labels import LABELS
from raysys.model import load_checkpoint
from raysys.presets import dicom_to_image
from raysys.testing import PROCESS_ATOL, free_port, settle_batchnorm, small_phantom, wait_healthy

pytestmark = pytest.mark.slow
BUCKET = "raysys-test"


def _keys(prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _read(key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _download(prefix: str, to: Path) -> Path:
    """The objects under `prefix`/ as files under `to` (directory marker objects skipped)."""
    for key in _keys(prefix.rstrip("/") + "/"):
        if key.endswith("/"):
            continue
        target = to / key[len(prefix.rstrip("/")) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_read(key))
    return to


@pytest.fixture(scope="module")
def bucket_run(ray_session, tmp_path_factory):
    """`raysys prepare` into the bucket, then `raysys train` reading that cache and checkpointing to the bucket."""
    root = tmp_path_factory.mktemp("s3")
    frame = small_phantom(root / "data", studies=6, seed=21)
    code, log, _ = _run(["prepare", "--data", str(root / "data" / "dicoms"), "--labels", str(root / "data" / "labels.csv"),
                         "--image-size", "80", "--out", f"s3://{BUCKET}/cache"], root, ray_session)
    assert code == 0, log[-3000:]
    cache = ["--data", f"s3://{BUCKET}/cache", "--labels", f"s3://{BUCKET}/cache/labels.csv"]
    code, log, _ = _run(["train", *cache, "--storage-path", f"s3://{BUCKET}/runs", "--name", "run", "--epochs", "2",
                         "--workers", "1", *TINY], root, ray_session)
    assert code == 0, log[-3000:]
    return {"root": root, "frame": frame, "cache": cache, "log": log}


def test_prepare_writes_the_cache_to_the_bucket_and_train_reads_it(bucket_run):
    keys = _keys("cache/")
    assert any(k.endswith(".parquet") for k in keys) and "cache/labels.csv" in keys
    frame = bucket_run["frame"]
    # Every slice is in the cache: the index in the bucket lists the phantom's image ids.
    split = pd.read_csv(io.BytesIO(_read("runs/run/split.csv")))
    assert sorted(split["image_id"]) == sorted(frame.index)


def test_train_checkpoints_metrics_and_tensorboard_land_in_the_bucket(bucket_run):
    keys = _keys("runs/run/")
    metrics = pd.read_csv(io.BytesIO(_read("runs/run/metrics.csv")))
    assert list(metrics["epoch"]) == [1, 2]
    assert sum(k.endswith("/model.pt") for k in keys) >= 1 and any("/tensorboard/events.out.tfevents." in k for k in keys)
    assert {"runs/run/config.yaml", "runs/run/curves.png", "runs/run/errors.csv"} <= set(keys)


def test_serve_loads_its_checkpoint_from_the_bucket(ray_session, bucket_run, tmp_path):
    from ray import serve

    from raysys.serve import build_app

    (best,) = {k.rsplit("/", 1)[0] for k in _keys("runs/run/") if k.endswith("/model.pt")
               and json.loads(_read(k.rsplit("/", 1)[0] + "/meta.json"))["epoch"] == 2}
    # Independently: the checkpoint fetched with boto3. Four training steps leave BatchNorm's statistics near their
    # start (every probability 0 or 1, whatever the input); the phantom's own are put in the bucket's copy.
    local = load_checkpoint(str(_download(best, tmp_path / "checkpoint")))
    paths = [bucket_run["root"] / "data" / "dicoms" / f"{i}.dcm" for i in bucket_run["frame"].index]
    images = np.stack([dicom_to_image(str(p), local.meta["windows"], local.meta["image_size"])[0] for p in paths])
    state = local.state | {"model": settle_batchnorm(local.model, images).state_dict()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"{best}/model.pt", Body=buffer.getvalue())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(f"s3://{BUCKET}/{best}"), name="s3", route_prefix="/s3", blocking=False)
        wait_healthy(f"http://127.0.0.1:{port}/s3")
        answers = [requests.post(f"http://127.0.0.1:{port}/s3/v1/predict", data=path.read_bytes(),
                                 headers={"Content-Type": "application/dicom"}, timeout=60).json() for path in paths[:2]]
    finally:
        serve.shutdown()
    expected = infer(local.model, images[:2], torch.device("cpu"))
    assert np.abs(expected[0] - expected[1]).max() > 10 * PROCESS_ATOL  # the check can fail
    got = np.array([[answer["probabilities"][name] for name in LABELS] for answer in answers])
    np.testing.assert_allclose(got, expected, atol=PROCESS_ATOL)


def test_keys_with_a_space_hash_question_mark_or_percent_are_listed_read_and_decoded(ray_session, tmp_path):
    """An object key is a name, not a URL: `s3://bucket/odd keys/a b#1.dcm` is that object (before, pyarrow parsed
    each path as a URI: a space was refused, "#" cut the key and "%20" read another object)."""
    small_phantom(tmp_path, studies=1, size=80, seed=5)
    files = sorted((tmp_path / "dicoms").rglob("*.dcm"))[:3]
    keys = ["odd keys/a b#1.dcm", "odd keys/c?d=1.dcm", "odd keys/e%20f.dcm"]
    client = boto3.client("s3")
    for key, path in zip(keys, files):
        client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
    client.put_object(Bucket=BUCKET, Key="odd keys/e f.dcm", Body=b"not the object e%20f.dcm names")
    root = f"s3://{BUCKET}/odd keys"
    assert set(storage.list_files(root, ".dcm")) == {f"s3://{BUCKET}/{key}" for key in [*keys, "odd keys/e f.dcm"]}
    for key, path in zip(keys, files):
        assert storage.read_bytes(f"s3://{BUCKET}/{key}") == path.read_bytes()
    found = rdata.scan(root, training=False, max_error_fraction=0.5)
    assert list(found.errors["path"]) == [f"{root}/e f.dcm"]
    by_path = dict(zip(found.index["path"], found.index["image_id"]))
    assert sorted(by_path) == sorted(f"s3://{BUCKET}/{key}" for key in keys)
    images = {r["image_id"]: r["image"] for r in rdata.image_dataset(found.index, found, size=80, with_labels=False)
              .take_all()}
    for key, path in zip(keys, files):  # independently: the local file each object was uploaded from
        assert np.array_equal(images[by_path[f"s3://{BUCKET}/{key}"]], dicom_to_image(str(path), DataConfig().windows, 80)[0])
