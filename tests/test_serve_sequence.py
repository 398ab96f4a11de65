"""Ray Serve with a sequence checkpoint on a real local Ray: whole series over real HTTP to 127.0.0.1.

Expected values are computed here, apart from the service: the checkpoint loaded with load_sequence, each
series' files ordered by the InstanceNumber pydicom reads from them, the CNN and the GRU run on that order.
"""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import torch

from raysys.config import ServeConfig
from raysys.engine import embed, infer
from raysys.labels import LABELS
from raysys.presets import dicom_to_image
from raysys.sequence import load_sequence, score_series
from raysys.serve import build_app
from raysys.synthetic import PhantomConfig, write_dataset
from raysys.testing import free_port, untrained_checkpoints, wait_healthy

SIZE = 96
SLICES = 5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, series):
    """(exported sequence checkpoint, its CNN checkpoint); the GRU's correction is random, not zero, so its answers
    differ from the CNN's."""
    paths = [p for v in series.values() for p in v]
    cnn_dir, best = untrained_checkpoints(tmp_path_factory.mktemp("seq-ck"), paths, SIZE)
    return best, cnn_dir


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints[0]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """{SeriesInstanceUID: file paths in slice order}; the order is InstanceNumber's, read by pydicom."""
    out = tmp_path_factory.mktemp("seq-phantom")
    frame = write_dataset(out, PhantomConfig(studies=2, slices_per_study=SLICES, size=SIZE, seed=5))
    by_series = {}
    for path in frame["path"]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append((int(ds.InstanceNumber), Path(path)))
    assert len(by_series) == 2 and all(len(v) == SLICES for v in by_series.values())
    return {uid: [p for _, p in sorted(v)] for uid, v in by_series.items()}


def _image_id(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _expected(checkpoint: Path, paths: list[Path]) -> dict:
    """`paths` as one series in the given order: image ids, sequence (T, 6) and CNN (T, 6) probabilities."""
    stage = load_sequence(checkpoint)
    width = stage.meta["sequence"]["features"]
    images = np.stack([dicom_to_image(p.read_bytes(), stage.meta["windows"], SIZE)[0] for p in paths])
    features, logits = embed(stage.cnn.model, images, CPU)
    # The GRU reads features rounded to float16, the way training and batch predict store them.
    item = {"features": features[:, :width].astype(np.float16).astype(np.float32), "cnn_logits": logits}
    return {"ids": [_image_id(p) for p in paths], "sequence": score_series(stage.model, [item], CPU)[0],
            "cnn": infer(stage.cnn.model, images, CPU)}


@pytest.fixture(scope="module")
def expected(checkpoint, series):
    return {uid: _expected(checkpoint, paths) for uid, paths in series.items()}


@pytest.fixture(scope="module")
def server(ray_session, checkpoint):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(checkpoint), ServeConfig(max_batch_size=8, max_files=16)), name="raysys-seq",
              route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield url
    serve.shutdown()


def _post_parts(url: str, parts: list[tuple[str, bytes]]) -> requests.Response:
    files = [("files", (name, body, "application/dicom")) for name, body in parts]
    return requests.post(f"{url}/v1/predict", files=files, timeout=60)


def _post_files(url: str, paths: list[Path]) -> requests.Response:
    return _post_parts(url, [(p.name, p.read_bytes()) for p in paths])


def _vector(named: dict) -> np.ndarray:
    assert list(named) == list(LABELS)
    return np.array([named[n] for n in LABELS])


def _check_series(answer: dict, number: int, want: dict) -> None:
    """answer's series `number` holds want's slices in order, with its probabilities and maximum."""
    rows = [r for r in answer["results"] if r["series"] == number]
    assert [r["image_id"] for r in rows] == want["ids"]
    assert [r["slice"] for r in rows] == list(range(len(want["ids"])))
    assert np.allclose([_vector(r["probabilities"]) for r in rows], want["sequence"], atol=1e-4)
    assert np.allclose([_vector(r["cnn_probabilities"]) for r in rows], want["cnn"], atol=1e-4)
    summary = answer["series"][number]
    assert summary["series"] == number and summary["slices"] == len(want["ids"])
    assert np.allclose(_vector(summary["max"]), want["sequence"].max(axis=0), atol=1e-4)


def test_a_shuffled_series_comes_back_in_slice_order_with_its_maxima(server, series, expected):
    uid, paths = next(iter(series.items()))
    shuffled = [paths[i] for i in (3, 0, 4, 2, 1)]
    r = _post_files(server, shuffled)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"results", "series", "model", "latency_ms"}
    assert [set(x) for x in answer["results"]] == [{"image_id", "series", "slice", "probabilities",
                                                    "cnn_probabilities"}] * SLICES
    assert len(answer["series"]) == 1 and {x["series"] for x in answer["results"]} == {0}
    _check_series(answer, 0, expected[uid])
    assert answer["model"]["stage"] == "sequence" and answer["model"]["epoch"] == 3
    assert answer["model"]["val_weighted_log_loss"] == 0.1 and answer["latency_ms"] > 0
    # The context changes the answer: the test's GRU corrects the CNN (which cnn_probabilities still gives).
    assert np.abs(expected[uid]["sequence"] - expected[uid]["cnn"]).max() > 0.05
    # Neither the SeriesInstanceUID nor patient data comes back.
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert uid not in r.text and str(ds.PatientID) not in r.text and str(ds.StudyInstanceUID) not in r.text


def test_two_series_in_one_request_are_numbered_by_their_first_part(server, series, expected):
    (uid_a, a), (uid_b, b) = series.items()
    parts = [b[2], a[4], a[0], b[0], b[4], a[1], b[1], a[3], b[3], a[2]]  # b first appears first: series 0
    r = _post_files(server, parts)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer["results"]) == 2 * SLICES and len(answer["series"]) == 2
    assert [x["series"] for x in answer["results"]] == [0] * SLICES + [1] * SLICES  # series after series
    _check_series(answer, 0, expected[uid_b])
    _check_series(answer, 1, expected[uid_a])


def test_a_single_slice_is_a_series_of_one(server, checkpoint, series):
    path = next(iter(series.values()))[2]
    want = _expected(checkpoint, [path])
    r = requests.post(f"{server}/v1/predict", data=path.read_bytes(), headers={"Content-Type": "application/dicom"},
                      timeout=60)
    assert r.status_code == 200, r.text
    one = r.json()
    assert set(one) == {"image_id", "probabilities", "cnn_probabilities", "model", "latency_ms"}
    assert one["image_id"] == want["ids"][0] and one["model"]["stage"] == "sequence"
    assert np.allclose(_vector(one["probabilities"]), want["sequence"][0], atol=1e-4)
    assert np.allclose(_vector(one["cnn_probabilities"]), want["cnn"][0], atol=1e-4)
    # The same slice as the one part of a multipart body: the series shape, one series of one slice.
    r = _post_files(server, [path])
    assert r.status_code == 200, r.text
    _check_series(r.json(), 0, want)


def test_a_duplicate_part_is_refused_and_the_service_keeps_serving(server, series):
    paths = next(iter(series.values()))
    r = _post_files(server, [paths[0], paths[1], paths[0]])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.startswith("part 3: ") and "part 1" in error and _image_id(paths[0]) in error
    assert _post_files(server, paths[:2]).status_code == 200


def test_a_garbage_part_in_a_series_is_refused_naming_the_part(server, series):
    paths = next(iter(series.values()))
    secret = "DOE^JANE_MRN4711.dcm"  # client file names often carry patient data: never echoed
    parts = [(p.name, p.read_bytes()) for p in paths[:2]] + [(secret, b"not a dicom file" * 20)] + \
        [(paths[2].name, paths[2].read_bytes())]
    r = _post_parts(server, parts)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("part 3: ") and "DOE" not in r.text and "4711" not in r.text
    assert _post_files(server, paths[2:4]).status_code == 200


def test_model_info_names_the_stage(server, checkpoints, series):
    from ray import serve

    info = requests.get(f"{server}/v1/model", timeout=10).json()
    assert info["stage"] == "sequence" and info["image_size"] == SIZE and info["labels"] == list(LABELS)
    assert info["sequence"] == {"features": 2048, "hidden": 16} and info["cnn"]["epoch"] == 2
    assert str(checkpoints[1]) not in str(info)  # the CNN's path on the training machine stays private
    # A CNN checkpoint beside it: stage "cnn", and its per-part answers keep their shape.
    serve.run(build_app(str(checkpoints[1]), ServeConfig()), name="cnn", route_prefix="/cnn")
    try:
        assert requests.get(f"{server}/cnn/v1/model", timeout=10).json()["stage"] == "cnn"
        paths = next(iter(series.values()))
        files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths[:2]]
        r = requests.post(f"{server}/cnn/v1/predict", files=files, timeout=60)
        assert r.status_code == 200 and set(r.json()) == {"results"}
        assert set(r.json()["results"][0]) == {"image_id", "probabilities", "model", "latency_ms"}
        assert "stage" not in r.json()["results"][0]["model"]
    finally:
        serve.delete("cnn")
