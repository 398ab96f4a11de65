"""Ray Serve on a real local Ray: real HTTP requests to 127.0.0.1, good and bad input, the token check."""

import io
import struct
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import torch
from pydicom.data import get_testdata_file

from raysys.config import Config, ServeConfig
from raysys.engine import infer
from raysys.labels import LABELS
from raysys.model import save_checkpoint
from raysys.presets import dicom_to_image
from raysys.serve import TOKEN_ENV, build_app
from raysys.synthetic import PhantomConfig, write_dataset
from raysys.testing import PROCESS_ATOL, free_port, hostile_bodies, untrained_cnn, wait_healthy

SIZE = 80
RSNA_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "rsna-sample"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, phantom):
    model = untrained_cnn(phantom, SIZE)  # probabilities away from 0 and 1: a wrong input would show
    model.logit_offset.copy_(torch.linspace(-1, 0.5, 6))
    cfg = Config().replace(**{"data.image_size": SIZE})
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "best", model, config=cfg.to_dict(), epoch=2,
                           metrics={"val_weighted_log_loss": 0.123})


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-phantom")
    frame = write_dataset(out, PhantomConfig(studies=1, slices_per_study=4, size=128, seed=9))
    return sorted(Path(p) for p in frame["path"])


LIMIT = 21 * 1024 * 1024  # max_body_bytes of the test server: room for the 20 MiB hostile body below


@pytest.fixture(scope="module")
def server(ray_session, checkpoint, tmp_path_factory):
    from ray import serve

    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text("s3cret\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(max_batch_size=4, max_body_bytes=LIMIT, max_files=8, token_file=str(token_file))
    serve.run(build_app(str(checkpoint), cfg), name="raysys", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield url
    serve.shutdown()


AUTH = {"Authorization": "Bearer s3cret", "Content-Type": "application/dicom"}


def _expected(checkpoint, body: bytes) -> np.ndarray:
    from raysys.model import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    image, _ = dicom_to_image(body, loaded.meta["windows"], loaded.meta["image_size"])
    return infer(loaded.model, image[None], torch.device("cpu"))[0]


def _post(url, body, headers=AUTH):
    return requests.post(f"{url}/v1/predict", data=body, headers=headers, timeout=60)


def test_phantom_dicom_gets_six_probabilities_equal_to_the_model(server, checkpoint, phantom):
    body = phantom[0].read_bytes()
    r = _post(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["image_id"] == pydicom.dcmread(phantom[0]).SOPInstanceUID
    assert list(out["probabilities"]) == list(LABELS)
    got = np.array([out["probabilities"][n] for n in LABELS])
    assert ((got >= 0) & (got <= 1)).all()
    assert np.allclose(got, _expected(checkpoint, body), atol=PROCESS_ATOL)
    assert out["model"]["val_weighted_log_loss"] == 0.123 and out["latency_ms"] > 0
    # Patient data never comes back.
    assert "PatientID" not in r.text and pydicom.dcmread(phantom[0]).PatientID not in r.text


def test_multipart_with_several_files(server, checkpoint, phantom):
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in phantom[:3]]
    r = requests.post(f"{server}/v1/predict", files=files, headers={"Authorization": "Bearer s3cret"}, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["image_id"] for x in results] == [pydicom.dcmread(p).SOPInstanceUID for p in phantom[:3]]
    expected = [_expected(checkpoint, p.read_bytes()) for p in phantom[:3]]
    for x, want in zip(results, expected):
        assert np.allclose([x["probabilities"][n] for n in LABELS], want, atol=PROCESS_ATOL)
    # The check can fail: each slice's answer is more than 10 x the tolerance from the others'.
    assert min(np.abs(expected[i] - expected[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))) > 10 * PROCESS_ATOL


def test_concurrent_requests_are_batched_and_all_succeed(server, phantom):
    from concurrent.futures import ThreadPoolExecutor

    def counts():
        return requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()["batching"]

    before = counts()
    bodies = [p.read_bytes() for p in phantom] * 4
    with ThreadPoolExecutor(8) as pool:
        codes = [r.status_code for r in pool.map(lambda b: _post(server, b), bodies)]
    assert codes == [200] * len(bodies)
    after = counts()
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == len(bodies)
    assert batches < images  # requests that waited while the model was busy shared a forward pass


def test_clients_that_hang_up_do_not_stall_the_next_requests(server, phantom):
    from concurrent.futures import ThreadPoolExecutor

    body = phantom[0].read_bytes()

    def hang_up(_):
        try:
            return _post_with_timeout(server, body, 0.005).status_code
        except requests.Timeout:
            return "timeout"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(hang_up, range(8)))
    assert "timeout" in outcomes  # some requests really were abandoned mid-flight
    assert _post(server, body).status_code == 200  # and their batching turn ended with them


def _post_with_timeout(url, body, timeout):
    return requests.post(f"{url}/v1/predict", data=body, headers=AUTH, timeout=timeout)


@pytest.mark.skipif(not RSNA_SAMPLE.is_dir(), reason=f"{RSNA_SAMPLE} not found (not part of the repository)")
def test_real_rsna_file(server, checkpoint):
    path = sorted(RSNA_SAMPLE.glob("*.dcm"))[0]
    r = _post(server, path.read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["image_id"] == path.stem
    got = np.array([r.json()["probabilities"][n] for n in LABELS])
    assert np.allclose(got, _expected(checkpoint, path.read_bytes()), atol=PROCESS_ATOL)


def _mr_bytes() -> bytes:
    return Path(get_testdata_file("MR_small.dcm")).read_bytes()


def _multiframe_bytes(phantom) -> bytes:
    ds = pydicom.dcmread(phantom[0])
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "make, status",
    [
        (lambda ph: b"definitely not a dicom file" * 10, 400),
        (lambda ph: ph[1].read_bytes()[:-5000], 400),  # truncated pixel data
        (lambda ph: _mr_bytes(), 422),  # a valid DICOM, but MR
        (lambda ph: _multiframe_bytes(ph), 422),
        (lambda ph: b"\0" * (LIMIT + 1), 413),
        (lambda ph: hostile_bodies(ph[0].read_bytes())["truncated"], 400),  # cut inside the header
        (lambda ph: hostile_bodies(ph[0].read_bytes())["rle_bomb"], 400),  # claims 16384 x 16384
        (lambda ph: hostile_bodies(ph[0].read_bytes())["deflate_bomb"], 400),  # inflates to 600 MiB
    ],
    ids=["garbage", "truncated", "mr", "multiframe", "oversized", "header-cut", "rle-bomb", "deflate-bomb"],
)
def test_bad_input_gets_a_json_error_and_the_replica_keeps_serving(server, phantom, make, status):
    r = _post(server, make(phantom))
    assert r.status_code == status, r.text
    assert r.json()["error"]
    assert _post(server, phantom[2].read_bytes()).status_code == 200  # same replica, next request fine


def test_token_is_required_when_configured(server, phantom):
    body = phantom[0].read_bytes()
    assert _post(server, body, {"Content-Type": "application/dicom"}).status_code == 401
    assert _post(server, body, {"Content-Type": "application/dicom", "Authorization": "Bearer nope"}).status_code == 401
    assert requests.get(f"{server}/v1/model", timeout=10).status_code == 401


def _partial_post(url: str, path: str, headers: dict, promised: int, sent: bytes, timeout: float = 10) -> bytes:
    """POST over a raw socket whose Content-Length promises `promised` bytes of which only `sent` are written: the
    answer (head and body), or socket.timeout when the server waits for the rest of the body."""
    import re
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    head = [f"POST {path} HTTP/1.1", f"Host: {where.netloc}", f"Content-Length: {promised}",
            *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as connection:
        connection.sendall("\r\n".join(head).encode() + sent)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", answer.lower()).group(1)):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_the_gateway_refuses_a_request_without_the_token_before_reading_its_body(server, phantom):
    """The 401 comes before the body is read: a body promised but never sent still gets it at once, where reading
    first would wait for the bytes until the client gives up; the answer is the replica's own 401."""
    start = time.perf_counter()
    answer = _partial_post(server, "/v1/predict", {"Content-Type": "application/dicom"}, 10 * 1024 * 1024, b"DICM")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b'{"error":"missing or wrong bearer token"}' in answer and b"www-authenticate: bearer" in answer.lower()
    wrong = _partial_post(server, "/v1/explain", {"Content-Type": "multipart/form-data; boundary=x",
                                                 "Authorization": "Bearer nope"}, 1024 * 1024, b"--x\r\n")
    assert wrong.startswith(b"HTTP/1.1 401 "), wrong[:200]
    assert time.perf_counter() - start < 5
    # A real client writing its whole 20 MiB gets the 401 JSON too (the server discards the rest), not a reset.
    r = _post(server, b"\0" * (20 * 1024 * 1024), {"Content-Type": "application/dicom"})
    assert r.status_code == 401 and r.json() == {"error": "missing or wrong bearer token"}
    assert r.headers["www-authenticate"] == "Bearer"
    assert _post(server, phantom[0].read_bytes()).status_code == 200  # with the token: read and answered


def test_the_environment_token_is_stripped_and_a_blank_one_is_no_token(server, monkeypatch):
    """RAYSYS_API_TOKEN="tok\\n" (as `$(cat file)` or an env file leaves it) is the token "tok" on a real Gateway (the
    variable in its worker's environment); "  \\n" is no token, as "" is."""
    import json

    from ray import serve

    from raysys.serve import Gateway, _env_token

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        async def forward(self, scope: dict, body: bytes) -> tuple[int, list, bytes]:
            answer = json.dumps({"bytes": len(body)}).encode()
            return 200, [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())], answer

    options = {**Gateway.ray_actor_options, "runtime_env": {"env_vars": {TOKEN_ENV: "tok\n"}}}
    app = Gateway.options(ray_actor_options=options).bind(Echo.bind(), max_body_bytes=1024, require_token=True)
    serve.run(app, name="envtoken", route_prefix="/envtoken")
    try:
        url = f"{server}/envtoken/v1/predict"
        assert requests.post(url, data=b"abc", headers={"Authorization": "Bearer tok"}, timeout=30).json() == {"bytes": 3}
        assert requests.post(url, data=b"abc", timeout=30).status_code == 401
        # Within the route prefix: /v1/ needs the token, a public GET does not (and relays no body).
        assert requests.get(f"{server}/envtoken/v1/model", timeout=30).status_code == 401
        assert requests.get(f"{server}/envtoken/healthz", data=b"abc", timeout=30).json() == {"bytes": 0}
    finally:
        serve.delete("envtoken")
    for blank in ("", "  \n", "\t"):
        monkeypatch.setenv(TOKEN_ENV, blank)
        assert _env_token() is None
    monkeypatch.setenv(TOKEN_ENV, " tok\n")
    assert _env_token() == "tok"


def test_model_info_and_health(server):
    r = requests.get(f"{server}/v1/model", headers={"Authorization": "Bearer s3cret"}, timeout=10)
    assert r.status_code == 200
    info = r.json()
    assert info["labels"] == list(LABELS) and info["image_size"] == SIZE
    assert info["windows"] == "brain,subdural,soft_tissue"
    assert info["neighbors"] == 0 and info["limits"] == {"max_body_bytes": LIMIT, "max_files": 8}
    assert requests.get(f"{server}/healthz", timeout=10).json()["status"] == "ok"


def _hostile_body(phantom, size: int) -> bytes:
    """A phantom's header, then `size` bytes of 10-byte private elements and no PixelData: costly to reject.

    An empty sequence of undefined length comes first, so that the whole body goes through pydicom's parser
    (raysys' own header scan hands such files over), the slowest path there is: seconds for 20 MiB."""
    ds = pydicom.dcmread(phantom[0])
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)  # the phantom's explicit VR little endian
    sequence = struct.pack("<HH2sxxI", 0x0009, 0x1001, b"SQ", 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    element = struct.pack("<HH2sH", 0x0009, 0x1010, b"LO", 2) + b"ab"
    return buf.getvalue() + sequence + element * (size // len(element))


def test_health_and_small_requests_answer_while_hostile_bodies_decode(server, phantom):
    """Decoding runs off the event loop, and real-sized slices do not queue behind a 20 MiB body."""
    from concurrent.futures import ThreadPoolExecutor

    hostile = _hostile_body(phantom, 20 * 1024 * 1024)
    good = phantom[0].read_bytes()

    def timed(call):
        start = time.perf_counter()
        r = call()
        return r.status_code, time.perf_counter() - start

    with ThreadPoolExecutor(4) as pool:
        attacks = [pool.submit(timed, lambda: _post(server, hostile)) for _ in range(2)]
        time.sleep(1.0)  # the bodies are uploaded and being decoded
        probes = []
        while not all(a.done() for a in attacks) and len(probes) < 40:
            probes.append(timed(lambda: requests.get(f"{server}/healthz", timeout=10)))
            probes.append(timed(lambda: _post(server, good)))
        attack_results = [a.result() for a in attacks]
    assert [code for code, _ in attack_results] == [400, 400]  # no PixelData: named and refused
    assert len(probes) >= 4, f"the hostile requests ended before any probe ran ({attack_results}): test too weak"
    assert all(code == 200 for code, _ in probes), probes
    assert max(seconds for _, seconds in probes) < 1.0, probes


def _urllib_post(url: str, body: bytes) -> tuple[int, dict]:
    """POST with Python's urllib, which writes the whole body before it reads any answer."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url}/v1/predict", data=body, method="POST", headers=AUTH)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_oversized_body_gets_a_readable_413_with_requests_and_urllib(server, phantom):
    body = b"\0" * (LIMIT + 1024 * 1024)
    for _ in range(4):  # a reset connection showed up about half the time before the body was drained
        r = _post(server, body)
        assert r.status_code == 413 and "limit" in r.json()["error"]
        status, answer = _urllib_post(server, body)
        assert status == 413 and "limit" in answer["error"]
    assert _post(server, phantom[0].read_bytes()).status_code == 200


def test_multipart_file_count_is_limited_and_file_names_never_come_back(server, phantom):
    import ray

    auth = {"Authorization": "Bearer s3cret"}
    body = phantom[0].read_bytes()
    nine = [("files", (f"scan{i}.dcm", body, "application/dicom")) for i in range(9)]  # max_files is 8
    r = requests.post(f"{server}/v1/predict", files=nine, headers=auth, timeout=60)
    assert r.status_code == 413 and "more than 8 parts" in r.json()["error"]
    eight = requests.post(f"{server}/v1/predict", files=nine[:8], headers=auth, timeout=60)
    assert eight.status_code == 200 and len(eight.json()["results"]) == 8

    secret_name = "DOE^JANE_MRN4711.dcm"  # file names often carry a patient's name or record number
    files = [("files", ("ok.dcm", body, "application/dicom")),
             ("files", (secret_name, b"not a dicom file" * 20, "application/dicom"))]
    r = requests.post(f"{server}/v1/predict", files=files, headers=auth, timeout=60)
    assert r.status_code == 400 and r.json()["error"].startswith("part 2: ")
    assert "DOE" not in r.text and "4711" not in r.text
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaked = [p for p in logs.rglob("*") if p.is_file() and b"MRN4711" in p.read_bytes()]
    assert leaked == []


def test_replica_refuses_to_start_without_the_token_the_driver_asked_for(server, checkpoint, monkeypatch):
    """The driver has RAYSYS_API_TOKEN, the replicas' node does not: no replica may serve openly."""
    from ray import serve

    monkeypatch.setenv(TOKEN_ENV, "only-on-the-driver")  # the session's Ray started without it
    with pytest.raises(RuntimeError, match="Deploying application open failed"):
        serve.run(build_app(str(checkpoint), ServeConfig()), name="open", route_prefix="/open")
    # The Gateway (HTTP) and the model replicas both refuse; whichever failed first is the application's reason.
    reasons = " ".join(d.message for d in serve.status().applications["open"].deployments.values())
    assert f"a bearer token is required but {TOKEN_ENV} is not set on this node" in reasons
    # The route exists but nothing serves it.
    assert requests.post(f"{server}/open/v1/predict", data=b"x", headers=AUTH, timeout=10).status_code == 503
    serve.delete("open")


def test_the_gateway_retries_a_lost_replica_once_then_answers_json_503(server):
    """raysys.serve.Gateway in front of a real deployment whose replica process dies (os._exit) on every request with
    the body b"die": the retry dies too, and the client gets a JSON 503 with Retry-After instead of Serve's plain-text
    500. Other bodies are answered through the Gateway unchanged (status, headers, body), before and after."""
    import os

    from ray import serve

    from raysys.serve import Gateway

    @serve.deployment(max_ongoing_requests=4)
    class Mortal:
        def __init__(self):
            self.pid = os.getpid()

        async def forward(self, scope: dict, body: bytes) -> tuple[int, list, bytes]:
            if body == b"die":
                os._exit(1)  # the process is gone at once, as when a node crashes or the kernel kills it
            answer = f'{{"method": "{scope["method"]}", "path": "{scope["path"]}", "pid": {self.pid}}}'.encode()
            return 201, [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode()),
                         (b"x-raysys-test", b"relayed")], answer

    serve.run(Gateway.bind(Mortal.bind(), max_body_bytes=1024), name="mortal", route_prefix="/mortal")
    try:
        def relayed():
            r = requests.post(f"{server}/mortal/anything", data=b"fine", timeout=60)
            assert r.status_code == 201 and r.headers["x-raysys-test"] == "relayed"
            assert r.json()["method"] == "POST" and r.json()["path"].endswith("/anything")
            return r.json()["pid"]

        first = relayed()
        r = requests.post(f"{server}/mortal/anything", data=b"die", timeout=120)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "was lost" in r.json()["error"] and "/anything" in r.json()["error"]
        assert requests.post(f"{server}/mortal/x", data=b"x" * 1025, timeout=60).status_code == 413  # read by the Gateway
        deadline = time.monotonic() + 120  # Serve starts a replica in place of the dead ones
        while True:
            try:
                assert relayed() != first  # a new process answers
                break
            except (AssertionError, requests.RequestException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        serve.delete("mortal")
