"""POST /v1/explain and the viewer's static files on a real local Ray: real HTTP requests to 127.0.0.1.

One Serve instance holds three applications for the whole module: a CNN checkpoint at / (bearer token from a
token_file), a sequence checkpoint built on the same CNN at /seq (open) and an untrained 2.5D checkpoint at /wide
(open). Expected values come from the checkpoint loaded here: /v1/predict's answer, raysys.engine.infer,
raysys.presets.dicom_to_image, and raysys.explain.explain (tested against independent computations in
test_explain_core.py).
"""

import base64
import contextlib
import http.client
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pydicom
import pytest
import requests
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from raysys.config import Config, ServeConfig
from raysys.engine import infer
from raysys.explain import DEFAULT_LAYER, DEFAULT_METHOD, explain
from raysys.labels import LABELS
from raysys.model import build_model, load_checkpoint, save_checkpoint
from raysys.presets import dicom_to_image
from raysys.serve import build_app
from raysys.synthetic import PhantomConfig, write_dataset
from raysys.testing import free_port, settle_batchnorm, untrained_checkpoints, wait_healthy

SIZE = 80
LIMIT = 1024 * 1024  # max_body_bytes: a 128 px phantom slice is about 33 KiB
MAX_FILES = 4
CPU = torch.device("cpu")
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DICOM = {**AUTH, "Content-Type": "application/dicom"}
VIEWER = Path(__file__).resolve().parents[1] / "raysys" / "viewer"
# The checkpoint's windows (Config's default "brain,subdural,soft_tissue"), written out by hand.
WINDOWS = [("brain", 40, 80), ("subdural", 80, 200), ("soft_tissue", 40, 380)]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One series of 4 slices, sorted by file name (not slice order)."""
    frame = write_dataset(tmp_path_factory.mktemp("explain-phantom"),
                          PhantomConfig(studies=1, slices_per_study=4, size=128, seed=9))
    return sorted(Path(p) for p in frame["path"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, phantom):
    """(CNN checkpoint, sequence checkpoint on that CNN). The CNN's BatchNorm statistics come from one train-mode
    pass over the phantom, so its activations are as moderate as a trained model's (an untrained InceptionV3's
    logits are ~1e7, every probability 0 or 1); the GRU's correction is random."""
    return untrained_checkpoints(tmp_path_factory.mktemp("explain-ck"), phantom, SIZE)


def _in_slice_order(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))


def _stacks(images: list[np.ndarray]) -> np.ndarray:
    """(T, 9, S, S): each of a series' images (in slice order) between its neighbours, itself past either end."""
    last = len(images) - 1
    return np.stack([np.concatenate([images[max(k - 1, 0)], images[k], images[min(k + 1, last)]])
                     for k in range(len(images))])


@pytest.fixture(scope="module")
def wide(tmp_path_factory, phantom):
    """(2.5D checkpoint with one neighbour on each side, its model) without training: an untrained network whose
    BatchNorm statistics are those of the phantom's stacks, so that its probabilities are not all 0 or 1."""
    torch.manual_seed(0)
    model = settle_batchnorm(build_model(image_size=SIZE, neighbors=1, init=False),
                             _stacks([_image(p) for p in _in_slice_order(phantom)]))
    config = Config().replace(**{"data.image_size": SIZE, "data.neighbors": 1}).to_dict()
    return save_checkpoint(tmp_path_factory.mktemp("wide-ck") / "best", model, config=config, epoch=1, metrics={}), model


@pytest.fixture(scope="module")
def server(ray_session, checkpoints, wide, tmp_path_factory):
    from ray import serve

    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(max_batch_size=8, max_body_bytes=LIMIT, max_files=MAX_FILES, token_file=str(token_file))
    serve.run(build_app(str(checkpoints[0]), cfg), name="explain-cnn", route_prefix="/", blocking=False)
    serve.run(build_app(str(checkpoints[1]), ServeConfig(cpus_per_replica=0.5, max_batch_size=8)), name="explain-seq",
              route_prefix="/seq", blocking=False)
    serve.run(build_app(str(wide[0]), ServeConfig(cpus_per_replica=0.25, max_batch_size=8)), name="explain-wide",
              route_prefix="/wide", blocking=False)
    url = f"http://127.0.0.1:{port}"
    for prefix in ("", "/seq", "/wide"):
        wait_healthy(f"{url}{prefix}")
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_checkpoint(checkpoints[0]).model


def _raw(url: str, path: str, body: bytes, headers=DICOM) -> requests.Response:
    return requests.post(f"{url}{path}", data=body, headers=headers, timeout=120)


def _parts(url: str, path: str, bodies: list[bytes], headers=AUTH) -> requests.Response:
    files = [("files", (f"f{i}.dcm", body, "application/dicom")) for i, body in enumerate(bodies)]
    return requests.post(f"{url}{path}", files=files, headers=headers, timeout=120)


def _vector(named: dict) -> np.ndarray:
    assert list(named) == list(LABELS)
    return np.array([named[label] for label in LABELS])


def _png(text: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "PNG" and image.mode == "L"
    return np.asarray(image)


@contextlib.contextmanager
def _replica_threads():
    """torch on the replica's one thread (cpus_per_replica=1): CPU kernels differ in the last bits with the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Probabilities of one image batched with different others (predict's and explain's batches need not be formed
# alike) differ in the last bits, up to ~1e-4 for this checkpoint.
BATCHED_ATOL = 1e-4
# The same for a heat map's 8-bit pixels: up to 2 of 255 levels measured.
BATCHED_LEVELS = 3


def _image(path: Path) -> np.ndarray:
    """(3, SIZE, SIZE) uint8: the model input, computed here."""
    return dicom_to_image(path.read_bytes(), "brain,subdural,soft_tissue", SIZE)[0]


def _check_shown(answer: dict, path: Path, model=None) -> None:
    """answer's heat maps and windows are those of the file at `path` (and, given the model, explain()'s maps)."""
    assert answer["size"] == SIZE
    assert answer["explain"] == {"method": DEFAULT_METHOD, "layer": DEFAULT_LAYER}  # what explain() uses unless told
    assert list(answer["heatmaps"]) == list(LABELS)
    maps = np.stack([_png(answer["heatmaps"][label]) for label in LABELS])
    assert maps.shape == (len(LABELS), SIZE, SIZE) and maps.dtype == np.uint8
    assert all(m.max() > m.min() for m in maps), "a constant heat map"
    image = _image(path)
    assert [(w["name"], w["center"], w["width"]) for w in answer["windows"]] == WINDOWS
    np.testing.assert_array_equal(np.stack([_png(w["png"]) for w in answer["windows"]]), image)
    if model is not None:
        with _replica_threads():
            _, expected = explain(model, image[None], CPU)
        want = np.round(expected[0] * 255)
        assert np.abs(maps.astype(int) - want).max() <= 1  # 8-bit quantisation of float maps computed alike


def test_a_raw_body_gets_predicts_probabilities_heat_maps_and_windows(server, phantom, model):
    body = phantom[0].read_bytes()
    r = _raw(server, "/v1/explain", body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert list(answer) == ["image_id", "probabilities", "heatmaps", "windows", "size", "explain", "model", "latency_ms"]
    assert answer["image_id"] == pydicom.dcmread(phantom[0]).SOPInstanceUID
    predicted = _raw(server, "/v1/predict", body).json()
    assert answer["probabilities"] == predicted["probabilities"]  # the same forward pass, bit for bit
    with _replica_threads():
        expected = infer(model, _image(phantom[0])[None], CPU)[0]
    np.testing.assert_array_equal(_vector(answer["probabilities"]), expected)
    assert answer["model"] == predicted["model"] and answer["latency_ms"] > 0
    _check_shown(answer, phantom[0], model)
    assert pydicom.dcmread(phantom[0]).PatientID not in r.text


def test_multipart_answers_each_part_in_part_order(server, phantom, model):
    paths = [phantom[2], phantom[0], phantom[3]]
    bodies = [p.read_bytes() for p in paths]
    r = _parts(server, "/v1/explain", bodies)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"results", "model", "latency_ms"}
    results = answer["results"]
    assert [x["image_id"] for x in results] == [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    predicted = _parts(server, "/v1/predict", bodies).json()["results"]
    for got, want, path in zip(results, predicted, paths):
        assert list(got) == ["image_id", "probabilities", "heatmaps", "windows", "size", "explain"]
        np.testing.assert_allclose(_vector(got["probabilities"]), _vector(want["probabilities"]), rtol=0, atol=BATCHED_ATOL)
        _check_shown(got, path)


def test_concurrent_explain_requests_share_batches(server, phantom):
    def counts():
        return requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()["batching"]

    before = counts()
    bodies = [p.read_bytes() for p in phantom] * 3
    with ThreadPoolExecutor(6) as pool:
        codes = [r.status_code for r in pool.map(lambda b: _raw(server, "/v1/explain", b), bodies)]
    assert codes == [200] * len(bodies)
    after = counts()
    images = after["explain_images"] - before["explain_images"]
    assert images == len(bodies) and after["explain_batches"] - before["explain_batches"] < images
    assert after["images"] == before["images"]  # predict's forward pass was not run as well


def _mr_bytes() -> bytes:
    return Path(get_testdata_file("MR_small.dcm")).read_bytes()


@pytest.mark.parametrize(
    "send, status, starts",
    [
        (lambda url, ph: _raw(url, "/v1/explain", b"definitely not a dicom file" * 10), 400, "body: "),
        (lambda url, ph: _raw(url, "/v1/explain", ph[1].read_bytes()[:-5000]), 400, "body"),  # truncated pixels
        (lambda url, ph: _raw(url, "/v1/explain", _mr_bytes()), 422, "body"),
        (lambda url, ph: _raw(url, "/v1/explain", b"\0" * (LIMIT + 1)), 413, "body"),
        (lambda url, ph: _raw(url, "/v1/explain", ph[0].read_bytes(), {**AUTH, "Content-Type": "text/plain"}), 415,
         "send the DICOM"),
        (lambda url, ph: _parts(url, "/v1/explain", [ph[0].read_bytes(), b"not a dicom" * 20]), 400, "part 2: "),
        (lambda url, ph: _parts(url, "/v1/explain", [ph[0].read_bytes()] * (MAX_FILES + 1)), 413, "multipart body has"),
    ],
    ids=["garbage", "truncated", "mr", "oversized", "wrong-type", "bad-part", "too-many-parts"],
)
def test_bad_input_gets_a_json_error_and_the_replica_keeps_serving(server, phantom, send, status, starts):
    r = send(server, phantom)
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(starts), r.json()
    assert _raw(server, "/v1/explain", phantom[2].read_bytes()).status_code == 200


def test_the_part_limit_admits_max_files(server, phantom):
    r = _parts(server, "/v1/explain", [p.read_bytes() for p in phantom][:MAX_FILES])
    assert r.status_code == 200 and len(r.json()["results"]) == MAX_FILES


def test_explain_needs_the_token_and_the_viewer_does_not(server, phantom):
    body = phantom[0].read_bytes()
    assert _raw(server, "/v1/explain", body, {"Content-Type": "application/dicom"}).status_code == 401
    wrong = _raw(server, "/v1/explain", body, {"Content-Type": "application/dicom", "Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]
    assert _parts(server, "/v1/explain", [body], headers={}).status_code == 401
    assert requests.get(f"{server}/", timeout=10).status_code == 200
    assert requests.get(f"{server}/viewer/index.html", timeout=10).status_code == 200


def test_the_viewer_is_served_with_its_content_types(server):
    r = requests.get(f"{server}/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == (VIEWER / "index.html").read_bytes()
    kinds = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png",
             ".svg": "image/svg+xml"}
    files = [p for p in VIEWER.iterdir() if p.is_file() and p.suffix in kinds and not p.name.startswith(".")]
    assert files
    for path in files:
        r = requests.get(f"{server}/viewer/{path.name}", timeout=10)
        assert r.status_code == 200, path.name
        assert r.headers["content-type"].split(";")[0] == kinds[path.suffix], path.name
        assert r.content == path.read_bytes()


def _get_raw_path(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (requests and urllib3 would resolve the dot segments first)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/viewer/../serve.py", "/viewer/..%2Fserve.py", "/viewer/%2e%2e/serve.py",
                                  "/viewer/../../pyproject.toml", "/viewer/..", "/viewer/", "/viewer/missing.js",
                                  "/viewer/sub/index.html", "/viewer/%2Fetc%2Fpasswd", "/viewer//etc/passwd"])
def test_anything_but_a_viewer_file_is_refused(server, path):
    status, body = _get_raw_path(server, path)
    assert status == 404, (path, body[:200])
    assert json.loads(body)["error"]
    assert b"import" not in body and b"root:" not in body


def test_sequence_explain_answers_predicts_sequence_answer(server, phantom):
    """For a sequence checkpoint the probabilities are predict's (series context, slice order), with the CNN's
    heat maps and the windows of each slice attached to that slice."""
    paths = [phantom[i] for i in (3, 1, 0, 2)]
    bodies = [p.read_bytes() for p in paths]
    r = _parts(server, "/seq/v1/explain", bodies, headers={})
    assert r.status_code == 200, r.text
    answer = r.json()
    predicted = _parts(server, "/seq/v1/predict", bodies, headers={}).json()
    assert set(answer) == {"results", "series", "model", "latency_ms"} and answer["model"] == predicted["model"]
    assert [(x["image_id"], x["series"], x["slice"]) for x in answer["results"]] == \
        [(x["image_id"], x["series"], x["slice"]) for x in predicted["results"]]
    for got, want in zip(answer["results"], predicted["results"]):
        for key in ("probabilities", "cnn_probabilities"):
            np.testing.assert_allclose(_vector(got[key]), _vector(want[key]), rtol=0, atol=BATCHED_ATOL)
        # The sequence stage corrects the CNN, so these are not the CNN's numbers under another name.
        assert not np.allclose(_vector(got["probabilities"]), _vector(got["cnn_probabilities"]), atol=1e-3)
    assert [(s["series"], s["slices"]) for s in answer["series"]] == [(s["series"], s["slices"]) for s in predicted["series"]]
    np.testing.assert_allclose(_vector(answer["series"][0]["max"]), _vector(predicted["series"][0]["max"]), atol=BATCHED_ATOL)
    by_id = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    for result in answer["results"]:  # each slice's pictures are its own, though parts were reordered
        _check_shown(result, by_id[result["image_id"]])

    one = _raw(server, "/seq/v1/explain", bodies[0], {"Content-Type": "application/dicom"}).json()
    single = _raw(server, "/seq/v1/predict", bodies[0], {"Content-Type": "application/dicom"}).json()
    assert list(one) == ["image_id", "probabilities", "cnn_probabilities", "heatmaps", "windows", "size", "explain",
                         "model", "latency_ms"]
    assert one["image_id"] == single["image_id"]
    for key in ("probabilities", "cnn_probabilities"):
        np.testing.assert_allclose(_vector(one[key]), _vector(single[key]), rtol=0, atol=BATCHED_ATOL)
    _check_shown(one, paths[0])


def test_labels_asks_for_those_heat_maps_only(server, phantom, model):
    """`?labels=any,subdural` answers those two maps, in that order, equal (to 8-bit rounding) to the maps of all six
    and to explain() computed here; the probabilities stay all six and predict's. Batched requests asking for
    different labels each get their own maps (within BATCHED_LEVELS: a batch of several images sums its floats in
    another order, which moved a pixel by up to 2 of 255 levels)."""
    body = phantom[1].read_bytes()
    everything = _raw(server, "/v1/explain", body).json()
    maps = {label: _png(everything["heatmaps"][label]).astype(int) for label in LABELS}
    # The check can fail: any two subtypes' maps differ by more than the rounding allowed below.
    # The check can fail: any two subtypes' maps differ by far more than a batch moves one (70 levels here).
    assert min(np.abs(maps[a] - maps[b]).max() for a in LABELS for b in LABELS if a < b) > 10 * BATCHED_LEVELS
    r = _raw(server, "/v1/explain?labels=any,subdural", body)
    assert r.status_code == 200, r.text
    some = r.json()
    assert list(some["heatmaps"]) == ["any", "subdural"]
    assert some["probabilities"] == everything["probabilities"] and some["windows"] == everything["windows"]
    with _replica_threads():
        _, expected = explain(model, _image(phantom[1])[None], CPU, labels=[LABELS.index("any"), LABELS.index("subdural")])
    for k, label in enumerate(["any", "subdural"]):
        assert np.abs(_png(some["heatmaps"][label]).astype(int) - maps[label]).max() <= 1
        assert np.abs(_png(some["heatmaps"][label]).astype(int) - np.round(expected[0, k] * 255)).max() <= 1

    asks = ["any", "epidural", "subdural,intraventricular", None] * 3
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda ask: _raw(server, "/v1/explain" + (f"?labels={ask}" if ask else ""), body), asks))
    for ask, answer in zip(asks, answers):
        assert answer.status_code == 200, answer.text
        heatmaps = answer.json()["heatmaps"]
        assert list(heatmaps) == (ask.split(",") if ask else list(LABELS))
        for label, encoded in heatmaps.items():  # the asked subtype's map, not the batch neighbour's
            assert np.abs(_png(encoded).astype(int) - maps[label]).max() <= BATCHED_LEVELS, (ask, label)

    seq = _raw(server, "/seq/v1/explain?labels=any", body, {"Content-Type": "application/dicom"}).json()
    assert list(seq["heatmaps"]) == ["any"] and "cnn_probabilities" in seq


@pytest.mark.parametrize("query", ["labels=", "labels=bleed", "labels=any,Any", "labels=,"])
def test_unknown_labels_get_a_400_naming_them(server, phantom, query):
    r = _raw(server, f"/v1/explain?{query}", phantom[0].read_bytes())
    assert r.status_code == 400 and r.json()["error"].startswith("labels: ")
    assert "choose among epidural, intraparenchymal" in r.json()["error"]
    assert _raw(server, "/v1/explain?labels=any", phantom[0].read_bytes()).status_code == 200


def test_a_query_parameter_given_twice_is_a_400(server, phantom):
    body = phantom[0].read_bytes()
    r = _raw(server, "/v1/explain?labels=any&labels=subdural", body)
    assert r.status_code == 400 and r.json()["error"].startswith("labels: given 2 times"), r.text
    r = _parts(server, "/wide/v1/explain?parts=1&parts=2", [body], headers={})
    assert r.status_code == 400 and r.json()["error"].startswith("parts: given 2 times"), r.text


def _count(url: str, key: str) -> int:
    return requests.get(f"{url}/v1/model", timeout=10).json()["batching"][key]


def test_parts_explains_those_parts_among_all_the_others(server, phantom, wide):
    """`?parts=3,1` on a 2.5D checkpoint: those two parts only (in part order, two backward passes), each explained as
    a slice between its real neighbours from the whole request: the answer of explaining every part, not that of the
    slice sent alone (its own copies as neighbours). Errors name the parameter."""
    url = f"{server}/wide"
    info = requests.get(f"{url}/v1/model", timeout=10).json()
    assert info["neighbors"] == 1 and info["limits"] == {"max_body_bytes": ServeConfig().max_body_bytes,
                                                         "max_files": ServeConfig().max_files}
    paths = [phantom[i] for i in (2, 0, 3, 1)]  # not in slice order
    bodies = [p.read_bytes() for p in paths]
    every = _parts(url, "/v1/explain", bodies, headers={}).json()["results"]
    before = _count(url, "explain_images")
    r = _parts(url, "/v1/explain?parts=3,1", bodies, headers={})
    assert r.status_code == 200, r.text
    some = r.json()["results"]
    assert _count(url, "explain_images") - before == 2
    assert [x["image_id"] for x in some] == [every[0]["image_id"], every[2]["image_id"]]
    for got, want, path in zip(some, (every[0], every[2]), (paths[0], paths[2])):
        np.testing.assert_allclose(_vector(got["probabilities"]), _vector(want["probabilities"]), rtol=0, atol=BATCHED_ATOL)
        for label in LABELS:
            assert np.abs(_png(got["heatmaps"][label]).astype(int) - _png(want["heatmaps"][label])).max() <= BATCHED_LEVELS
        np.testing.assert_array_equal(np.stack([_png(w["png"]) for w in got["windows"]]), _image(path))
        alone = _raw(url, "/v1/explain", path.read_bytes(), {"Content-Type": "application/dicom"}).json()
        assert np.abs(_vector(alone["probabilities"]) - _vector(got["probabilities"])).max() > 10 * BATCHED_ATOL  # can fail

    for query, error in [("parts=5", "parts: 5 past the request's 4 parts"), ("parts=0", "parts: '0' is not"),
                         ("parts=1,x", "parts: 'x' is not"), ("parts=", "parts: '' is not")]:
        r = _parts(url, f"/v1/explain?{query}", bodies, headers={})
        assert r.status_code == 400 and r.json()["error"].startswith(error), (query, r.text)
    r = _raw(url, "/v1/explain?parts=1", bodies[0], {"Content-Type": "application/dicom"})
    assert r.status_code == 400 and r.json()["error"].startswith("parts: only for a multipart body")

    # A sequence checkpoint: the part's slice with its series answer, from the whole request.
    full = _parts(server, "/seq/v1/explain", bodies, headers={}).json()
    one = _parts(server, "/seq/v1/explain?parts=2&labels=any", bodies, headers={}).json()
    want = next(x for x in full["results"] if x["image_id"] == one["results"][0]["image_id"])
    assert len(one["results"]) == 1 and one["results"][0]["image_id"] == str(pydicom.dcmread(paths[1]).SOPInstanceUID)
    assert (one["results"][0]["series"], one["results"][0]["slice"]) == (want["series"], want["slice"])
    np.testing.assert_allclose(_vector(one["results"][0]["probabilities"]), _vector(want["probabilities"]), atol=BATCHED_ATOL)
    assert list(one["results"][0]["heatmaps"]) == ["any"] and one["series"] == full["series"]


def _with_uid(path: Path, uid: str | None) -> bytes:
    """The file's bytes with SOPInstanceUID set to `uid` (any text: hostile files hold what they like) or removed."""
    import warnings

    ds = pydicom.dcmread(path)
    if uid is None:
        del ds.SOPInstanceUID
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns that it is not a valid UID
            ds.SOPInstanceUID = uid
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_2_5d_refuses_a_repeated_id_and_a_slice_without_one_keeps_its_own_neighbours(server, phantom, wide):
    """A SOPInstanceUID twice in one request would put one slice in the other's stack: 400 naming it. A slice without
    one stands in its own place, even beside a slice whose UID reads like a part number ("part 000001")."""
    url = f"{server}/wide"
    a, b, c, _ = _in_slice_order(phantom)
    twice = _parts(url, "/v1/predict", [a.read_bytes(), b.read_bytes(), a.read_bytes()], headers={})
    uid = str(pydicom.dcmread(a).SOPInstanceUID)
    assert twice.status_code == 400 and twice.json()["error"] == \
        f"part 3: image {uid} is also part 1; send each slice once per request", twice.text
    assert _parts(url, "/v1/explain", [a.read_bytes(), a.read_bytes()], headers={}).status_code == 400

    bodies = [_with_uid(a, None), _with_uid(b, "part 000001"), c.read_bytes()]
    names = [f"DOE^JANE_MRN4711_{k}.dcm" for k in range(3)]
    files = [("files", (name, body, "application/dicom")) for name, body in zip(names, bodies)]
    r = requests.post(f"{url}/v1/predict", files=files, timeout=120)
    assert r.status_code == 200, r.text
    got = np.stack([_vector(x["probabilities"]) for x in r.json()["results"]])
    assert [x["image_id"] for x in r.json()["results"]] == ["", "part 000001", str(pydicom.dcmread(c).SOPInstanceUID)]
    assert "MRN4711" not in r.text and "part:" not in r.text
    with _replica_threads():
        want = infer(wide[1], _stacks([_image(p) for p in (a, b, c)]), CPU)
    np.testing.assert_allclose(got, want, rtol=0, atol=BATCHED_ATOL)
    assert np.abs(want[0] - want[1]).max() > 10 * BATCHED_ATOL  # the check can fail: a's stack is not b's
