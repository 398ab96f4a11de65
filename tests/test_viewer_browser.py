"""The web viewer (raysys/viewer) in a real headless Chromium, against a real Serve deployment on 127.0.0.1.

The deployment requires a bearer token, so every scenario also goes through the page's token form. Expected
values come from the API, asked separately with `requests` for the same files, and from numpy: the heat-map
canvas is compared with the window and heat-map PNGs of /v1/explain, upsampled by OpenCV and coloured with
matplotlib's turbo colormap.
"""

import base64
import io
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pydicom
import pytest
import requests
from browser import chromium
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from raysys.config import Config, DataConfig, ServeConfig
from raysys.labels import LABELS
from raysys.model import build_model, save_checkpoint
from raysys.presets import dicom_to_image
from raysys.serve import build_app
from raysys.synthetic import DENSE_PREVALENCE, PhantomConfig, write_dataset
from raysys.testing import free_port, settle_batchnorm, untrained_checkpoints, wait_healthy

pytestmark = pytest.mark.slow  # three Serve deployments and a browser

SIZE = 96
SLICES = 6
CNN_MAX_FILES = 4  # the CNN app's max_files: the page splits a series of SLICES files into two requests
SEQUENCE_MAX_FILES = SLICES  # the sequence app's: a whole series fits, one more file does not
TOKEN = "v1ewer-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 60  # the longest any page state may take to appear
PATIENT_LIKE = "DOE^JANE_MRN4711"  # the chosen files are named like this: a name must never reach the page


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One series of SLICES phantom slices with dense bleeds, copied to files named like a patient, in slice order
    (InstanceNumber, read by pydicom)."""
    out = tmp_path_factory.mktemp("viewer-phantom")
    frame = write_dataset(out, PhantomConfig(studies=1, slices_per_study=SLICES, size=128, seed=9,
                                             prevalence=DENSE_PREVALENCE))
    named = out / "chosen"
    named.mkdir()
    paths = []
    in_order = sorted(frame["path"], key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    for k, path in enumerate(in_order):
        paths.append(named / f"{PATIENT_LIKE}_{k + 1}.dcm")
        shutil.copyfile(path, paths[-1])
    return paths


def _wide_checkpoint(root: Path, phantom: list[Path]) -> Path:
    """An untrained 2.5D InceptionV3 (one neighbour on each side), its BatchNorm statistics those of the phantom's
    stacks (as untrained_checkpoints does for the CNN), saved as a checkpoint."""
    import torch

    torch.manual_seed(0)
    images = [dicom_to_image(str(p), DataConfig().windows, SIZE)[0] for p in phantom]  # phantom: in slice order
    stacks = np.stack([np.concatenate([images[max(k - 1, 0)], images[k], images[min(k + 1, SLICES - 1)]])
                       for k in range(SLICES)])
    model = settle_batchnorm(build_model(image_size=SIZE, neighbors=1, init=False), stacks)
    config = Config().replace(**{"data.image_size": SIZE, "data.neighbors": 1}).to_dict()
    return save_checkpoint(root / "wide", model, config=config, epoch=1, metrics={})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, phantom):
    """{"cnn": an untrained InceptionV3, "sequence": a random series GRU on top of it, "wide": an untrained 2.5D one}.

    The CNN's BatchNorm statistics are the phantom's (one train-mode pass): activations are then as moderate as a
    trained model's, so probabilities and heat maps are not all 0 or 1. The GRU's correction is random, not zero,
    so its answers differ from the CNN's."""
    root = tmp_path_factory.mktemp("viewer-ck")
    cnn, sequence = untrained_checkpoints(root, phantom, SIZE)
    return {"cnn": cnn, "sequence": sequence, "wide": _wide_checkpoint(root, phantom)}


@pytest.fixture(scope="module")
def servers(ray_session, checkpoints, tmp_path_factory):
    """The three checkpoints served at once, their replicas starting side by side: the CNN at / (at most
    CNN_MAX_FILES files per request), the sequence stage at /seq (SEQUENCE_MAX_FILES), the 2.5D CNN at /wide; all
    need the bearer token (a token_file, as the replicas' node has no RAYSYS_API_TOKEN)."""
    from ray import serve

    token_file = tmp_path_factory.mktemp("viewer-token") / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Half a CPU each: the replicas fit beside whatever else the session's 2-CPU Ray still holds.
    cfg = ServeConfig(cpus_per_replica=0.5, max_batch_size=8, token_file=str(token_file))
    apps = {"cnn": ("viewer", "/", CNN_MAX_FILES), "sequence": ("viewer-sequence", "/seq", SEQUENCE_MAX_FILES),
            "wide": ("viewer-wide", "/wide", 16)}
    serve.run_many([serve.RunTarget(build_app(str(checkpoints[kind]), replace(cfg, max_files=most)), name=name,
                                    route_prefix=prefix) for kind, (name, prefix, most) in apps.items()])
    urls = {kind: f"http://127.0.0.1:{port}{prefix.rstrip('/')}" for kind, (_, prefix, _) in apps.items()}
    for url in urls.values():
        wait_healthy(url)
    yield urls
    serve.shutdown()


@pytest.fixture(scope="module")
def server(servers):
    return servers["cnn"]


@pytest.fixture(scope="module")
def browser():
    with chromium((1280, 900)) as driver:
        yield driver


# ---------------------------------------------------------------- the page, driven as a person would


def _open(driver, url: str, token: str | None = TOKEN) -> None:
    """Load the viewer in a fresh state; with a token, as a tab that has already been given it."""
    driver.get(f"{url}/")
    driver.execute_script("sessionStorage.clear()")
    if token:
        driver.execute_script("sessionStorage.setItem('raysys.token', arguments[0])", token)
    driver.get(f"{url}/")
    if token:
        _wait(driver, lambda d: d.find_element(By.ID, "bars").find_elements(By.CLASS_NAME, "bar"), "the model's labels")


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    """Wait for `condition(driver)`; fail at once, with the page's message, when the page shows an error."""
    def check(d):
        error = d.find_element(By.ID, "error")
        if error.is_displayed():
            raise AssertionError(f"the page shows an error while waiting for {what}: {error.text}")
        return condition(d)

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(check, f"waited {timeout} s for {what}")


def _status(driver) -> dict:
    return driver.execute_script(
        "const s = document.getElementById('status'); return {state: s.dataset.state, slice: s.dataset.slice,"
        " imageId: s.dataset.imageId, text: s.textContent}")


def _wait_ready(driver, slice_: int = 0) -> dict:
    status = _wait(driver, lambda d: (s := _status(d))["state"] == "ready" and s["slice"] == str(slice_) and s,
                   f"slice {slice_} to be ready")
    return status


def _choose(driver, paths: list[Path]) -> None:
    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))


def _drop(driver, paths: list[Path]) -> None:
    """Drop files on the drop zone, as when dragged from a file manager: a drop event whose DataTransfer holds
    File objects of the files' bytes (WebDriver cannot drag from outside the browser)."""
    payload = [base64.b64encode(p.read_bytes()).decode("ascii") for p in paths]
    driver.execute_script(
        "const transfer = new DataTransfer();"
        "arguments[0].forEach((b64, i) => transfer.items.add("
        "  new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], `dropped-${i}.dcm`)));"
        "document.getElementById('drop').dispatchEvent("
        "  new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));", payload)


def _bars(driver) -> dict[str, dict]:
    bars = driver.execute_script(  # a list: WebDriver does not keep an object's key order
        "return [...document.querySelectorAll('#bars .bar')].map(b => [b.dataset.label,"
        " {probability: b.dataset.probability, threshold: b.dataset.threshold, above: b.dataset.above,"
        "  cnn: b.dataset.cnnProbability,"
        "  shown: b.querySelector('.bar-value').textContent}])")
    return dict(bars)


def _canvas(driver) -> np.ndarray:
    """The heat-map canvas' pixels (H, W, 4) uint8, read with getImageData."""
    width, height, data = driver.execute_script(
        "const c = document.getElementById('heatmap');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = '';"
        "for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode.apply(null, d.subarray(i, i + 8192));"
        "return [c.width, c.height, btoa(s)];")
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width, 4)


def _drawn(driver, subtype: str, window: str, opacity: float) -> np.ndarray:
    """The canvas once the page has drawn this subtype over this window at this opacity."""
    def done(d):
        c = d.find_element(By.ID, "heatmap")
        return (c.get_attribute("data-subtype") == subtype and c.get_attribute("data-window") == window
                and abs(float(c.get_attribute("data-opacity") or "nan") - opacity) < 1e-9)

    _wait(driver, done, f"the canvas to show {subtype} over {window} at opacity {opacity}")
    return _canvas(driver)


def _screenshot(driver, path: Path) -> None:
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


# ---------------------------------------------------------------- independent references


def _predict_series(url: str, paths: list[Path]) -> list[dict]:
    files = [("files", (f"s{k}.dcm", p.read_bytes(), "application/dicom")) for k, p in enumerate(paths)]
    r = requests.post(f"{url}/v1/predict", files=files, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _image_id(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _predict(url: str, path: Path) -> dict:
    r = requests.post(f"{url}/v1/predict", data=path.read_bytes(),
                      headers={**AUTH, "Content-Type": "application/dicom"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _explain(url: str, path: Path) -> dict:
    r = requests.post(f"{url}/v1/explain", data=path.read_bytes(),
                      headers={**AUTH, "Content-Type": "application/dicom"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


TURBO = np.round(matplotlib.colormaps["turbo"](np.arange(256) / 255)[:, :3] * 255)  # (256, 3)


def _expected_canvas(answer: dict, subtype: str, window: str, opacity: float, side: int) -> np.ndarray:
    """(side, side, 3) float: the window image, then the subtype's heat map in turbo at `opacity`, both upsampled
    bilinearly (pixel centres aligned, as a canvas draws them)."""
    gray = _png(next(w["png"] for w in answer["windows"] if w["name"] == window)).astype(np.float32)
    heat = TURBO[_png(answer["heatmaps"][subtype])].astype(np.float32)  # coloured first, then scaled, as the page
    base = np.repeat(cv2.resize(gray, (side, side), interpolation=cv2.INTER_LINEAR)[..., None], 3, axis=2)
    return (1 - opacity) * base + opacity * cv2.resize(heat, (side, side), interpolation=cv2.INTER_LINEAR)


def _assert_canvas_matches(canvas: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert (canvas[..., 3] == 255).all(), f"{what}: the canvas has transparent pixels"
    diff = np.abs(canvas[..., :3].astype(np.float32) - expected)
    # Resampling filters and the page's 17-stop turbo differ from OpenCV and matplotlib by a few levels (measured:
    # mean 0.4-1.8, 99th percentile 5-9); another window (mean 5.6, 99th percentile 58), subtype or an opacity
    # 0.1 off (mean 10-23) differ by far more.
    assert diff.mean() < 2.5 and np.percentile(diff, 99) < 15, (what, diff.mean(), np.percentile(diff, 99))


# ---------------------------------------------------------------- scenarios


def test_page_asks_for_the_token_then_shows_results(server, browser, phantom, tmp_path):
    _open(browser, server, token=None)
    form = browser.find_element(By.ID, "token-form")
    _wait(browser, lambda d: form.is_displayed() and _status(d)["state"] == "auth", "the token form")
    assert form.get_attribute("data-waiting") == "model"
    _screenshot(browser, tmp_path / "token-asked.png")

    browser.find_element(By.ID, "token").send_keys("wrong-token", Keys.ENTER)
    _wait(browser, lambda d: form.is_displayed() and "not accepted" in d.find_element(By.ID, "token-message").text,
          "the page to refuse the wrong token")
    _choose(browser, phantom[:1])  # chosen while the page waits for a token: sent once the token is given
    _wait(browser, lambda d: form.is_displayed() and form.get_attribute("data-waiting") == "upload",
          "the token form, now holding the upload")
    browser.find_element(By.ID, "token").send_keys(TOKEN, Keys.ENTER)

    _wait_ready(browser, 0)
    assert not form.is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('raysys.token')") == TOKEN
    expected = _predict(server, phantom[0])
    assert {k: float(v["probability"]) for k, v in _bars(browser).items()} == expected["probabilities"]
    _screenshot(browser, tmp_path / "token-given.png")


def test_one_slice_shows_the_apis_probabilities_windows_and_heat_map(server, browser, phantom, tmp_path):
    path = phantom[2]
    _open(browser, server)
    _choose(browser, [path])
    status = _wait_ready(browser, 0)
    expected, explained = _predict(server, path), _explain(server, path)
    image_id = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert status["imageId"] == image_id == expected["image_id"]
    assert image_id in browser.find_element(By.ID, "slice-label").text

    bars = _bars(browser)
    assert list(bars) == list(LABELS)
    for label, bar in bars.items():
        p = expected["probabilities"][label]
        assert float(bar["probability"]) == p  # the API's number, exactly
        assert bar["shown"] == f"{p:.3f}"
        assert bar["above"] == str(p >= 0.5).lower() and float(bar["threshold"]) == 0.5

    windows = browser.find_elements(By.CSS_SELECTOR, "#windows figure")
    assert [w.get_attribute("data-window") for w in windows] == [w["name"] for w in explained["windows"]]
    assert len(windows) == 3
    for figure, window in zip(windows, explained["windows"]):
        shown = figure.find_element(By.TAG_NAME, "img").get_attribute("src")
        assert shown == f"data:image/png;base64,{window['png']}"
        assert f"C {window['center']:g} / W {window['width']:g}" in figure.text

    first = explained["windows"][0]["name"]
    canvas = _drawn(browser, "any", first, 0.45)
    side = canvas.shape[0]
    assert canvas[..., :3].std() > 10 and len(np.unique(canvas[..., :3].reshape(-1, 3), axis=0)) > 100  # not blank
    _assert_canvas_matches(canvas, _expected_canvas(explained, "any", first, 0.45, side), "any at 0.45")
    _screenshot(browser, tmp_path / "one-slice.png")

    # Another subtype whose heat map differs from `any`'s, by the API's PNGs.
    other = next(label for label in LABELS
                 if not np.array_equal(_png(explained["heatmaps"][label]), _png(explained["heatmaps"]["any"])))
    Select(browser.find_element(By.ID, "subtype")).select_by_value(other)
    changed = _drawn(browser, other, first, 0.45)
    assert np.abs(changed.astype(int) - canvas.astype(int)).max() > 20
    _assert_canvas_matches(changed, _expected_canvas(explained, other, first, 0.45, side), f"{other} at 0.45")

    opacity = browser.find_element(By.ID, "opacity")
    opacity.send_keys(Keys.END)  # the range's maximum: the heat map alone
    _assert_canvas_matches(_drawn(browser, other, first, 1.0), _expected_canvas(explained, other, first, 1.0, side),
                           f"{other} at 1")
    opacity.send_keys(Keys.HOME)  # none of it: the window alone
    _assert_canvas_matches(_drawn(browser, other, first, 0.0), _expected_canvas(explained, other, first, 0.0, side),
                           "window alone")

    second = explained["windows"][1]["name"]
    windows[1].click()  # a window's thumbnail puts it under the heat map
    _assert_canvas_matches(_drawn(browser, other, second, 0.0), _expected_canvas(explained, other, second, 0.0, side),
                           f"{second} window alone")


def test_a_dropped_file_and_thresholds_that_decide_which_bars_are_above(server, browser, phantom):
    path = phantom[3]
    _open(browser, server)
    _drop(browser, [path])
    status = _wait_ready(browser, 0)
    expected = _predict(server, path)
    assert status["imageId"] == expected["image_id"] == _image_id(path)
    p = expected["probabilities"]
    assert {label: float(b["probability"]) for label, b in _bars(browser).items()} == p

    def set_threshold(label: str, value: float) -> None:
        box = browser.find_element(By.CSS_SELECTOR, f'#bars input.threshold[data-label="{label}"]')
        box.clear()
        box.send_keys(f"{value:.2f}")
        _wait(browser, lambda d: float(_bars(d)[label]["threshold"]) == round(value, 2), f"{label}'s threshold")

    label = max(LABELS, key=lambda k: min(p[k], 1 - p[k]))  # the probability farthest from 0 and 1
    low, high = np.floor(p[label] * 100) / 100 - 0.01, np.ceil(p[label] * 100) / 100 + 0.01
    if low >= 0:
        set_threshold(label, low)
        assert _bars(browser)[label]["above"] == "true"
    if high <= 1:
        set_threshold(label, high)
        assert _bars(browser)[label]["above"] == "false"

    # The shared slider sets every threshold: at 0 every bar is above, at 1 only a probability of exactly 1.
    slider = browser.find_element(By.ID, "threshold-all")
    slider.send_keys(Keys.HOME)
    _wait(browser, lambda d: all(b["threshold"] == "0" for b in _bars(d).values()), "thresholds at 0")
    assert all(b["above"] == "true" for b in _bars(browser).values())
    slider.send_keys(Keys.END)
    _wait(browser, lambda d: all(b["threshold"] == "1" for b in _bars(d).values()), "thresholds at 1")
    assert {k: b["above"] for k, b in _bars(browser).items()} == {k: str(p[k] >= 1).lower() for k in LABELS}


def test_series_strip_keyboard_and_lazy_cached_explain(server, browser, phantom, tmp_path):
    _open(browser, server)
    explained_before = requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()["batching"]["explain_images"]
    _choose(browser, phantom)
    _wait_ready(browser, 0)
    # SLICES files, more than the server's CNN_MAX_FILES per request: the page sent them in two requests, as here.
    assert "Sent in 2 requests" in browser.find_element(By.ID, "strip-caption").text
    # A CNN checkpoint: in part order, the order the files were chosen in.
    results = _predict_series(server, phantom[:CNN_MAX_FILES]) + _predict_series(server, phantom[CNN_MAX_FILES:])
    ids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in phantom]
    assert [x["image_id"] for x in results] == ids

    cells = browser.find_elements(By.CSS_SELECTOR, "#strip .cell")
    assert len(cells) == SLICES
    assert [c.get_attribute("data-image-id") for c in cells] == ids
    assert [float(c.get_attribute("data-probability")) for c in cells] == [x["probabilities"]["any"] for x in results]

    def selected() -> list[int]:
        return [int(c.get_attribute("data-slice")) for c in browser.find_elements(By.CSS_SELECTOR, "#strip .cell")
                if c.get_attribute("aria-selected") == "true"]

    def shows(k: int) -> None:
        status = _wait_ready(browser, k)
        assert status["imageId"] == ids[k] and selected() == [k]
        assert browser.find_element(By.ID, "slice-label").text.startswith(f"Slice {k + 1} of {SLICES}")
        assert {label: float(b["probability"]) for label, b in _bars(browser).items()} == results[k]["probabilities"]

    shows(0)
    browser.find_element(By.ID, "heatmap").click()  # focus on the stack, as a reader would
    keys = ActionChains(browser)
    visited = [0]
    for key, k in [(Keys.ARROW_DOWN, 1), (Keys.ARROW_RIGHT, 2), (Keys.ARROW_UP, 1), (Keys.ARROW_LEFT, 0),
                   (Keys.ARROW_UP, 0)]:  # the last one: already at the first slice
        keys.send_keys(key).perform()
        if k != visited[-1]:
            shows(k)
        visited.append(k)
    cells[SLICES - 1].click()
    shows(SLICES - 1)
    _screenshot(browser, tmp_path / "series.png")
    keys.send_keys(Keys.ARROW_UP).perform()
    shows(SLICES - 2)
    visited += [SLICES - 1, SLICES - 2]

    # Each visited slice was explained once (lazily, one file per request) and then taken from the page's cache.
    batching = requests.get(f"{server}/v1/model", headers=AUTH, timeout=10).json()["batching"]
    assert batching["explain_images"] - explained_before == len(set(visited))

    # Neither the chosen files' names nor the header's patient fields reach the page.
    header = pydicom.dcmread(phantom[0], stop_before_pixels=True)
    page = browser.page_source
    for secret in ("MRN4711", "DOE", str(header.PatientName), str(header.PatientID), str(header.SeriesInstanceUID)):
        assert secret not in page, secret


def test_api_errors_are_shown_readably(server, browser, phantom, tmp_path):
    garbage = tmp_path / f"{PATIENT_LIKE}_broken.dcm"
    garbage.write_bytes(b"definitely not a dicom file" * 10)
    r = requests.post(f"{server}/v1/explain", data=garbage.read_bytes(),
                      headers={**AUTH, "Content-Type": "application/dicom"}, timeout=60)
    assert r.status_code == 400, r.text

    _open(browser, server)
    _choose(browser, [garbage])
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, WAIT_S).until(lambda d: error.is_displayed(), "the error message")
    assert error.text == f"The server answered 400: {r.json()['error']}"
    assert _status(browser)["state"] == "error"

    # In a series the API names the part; the page shows that, never the file's name.
    _choose(browser, [phantom[0], garbage])
    WebDriverWait(browser, WAIT_S).until(lambda d: error.is_displayed() and "part 2" in error.text, "the part's error")
    assert error.text.startswith("The server answered 400: part 2: ") and "MRN4711" not in browser.page_source
    _screenshot(browser, tmp_path / "error.png")


def test_sequence_checkpoint_series_in_slice_order_whatever_the_files_order(servers, browser, phantom, tmp_path):
    url = servers["sequence"]
    chosen = [phantom[k] for k in (3, 0, 5, 1, 4, 2)]  # not the slices' order, which the page cannot read
    _open(browser, url)
    _choose(browser, chosen)
    _wait_ready(browser, 0)
    assert "sequence checkpoint" in browser.find_element(By.ID, "model-info").text

    results = _predict_series(url, chosen)  # the sequence stage: in slice order, each slice in its series' context
    ids = [_image_id(p) for p in phantom]  # slice order by InstanceNumber, read here by pydicom
    assert [x["image_id"] for x in results] == ids and [x["slice"] for x in results] == list(range(SLICES))
    cells = browser.find_elements(By.CSS_SELECTOR, "#strip .cell")
    assert [c.get_attribute("data-image-id") for c in cells] == ids
    assert [float(c.get_attribute("data-probability")) for c in cells] == [x["probabilities"]["any"] for x in results]

    ActionChains(browser).send_keys(Keys.END).perform()  # the last slice
    for k in (SLICES - 1, 2):
        if k == 2:
            cells[2].click()
        status = _wait_ready(browser, k)
        assert status["imageId"] == ids[k]
        bars = _bars(browser)
        assert {label: float(b["probability"]) for label, b in bars.items()} == results[k]["probabilities"]
        assert {label: float(b["cnn"]) for label, b in bars.items()} == results[k]["cnn_probabilities"]
        # The windows shown are those of the slice's own file: the page sent the right file to /v1/explain.
        explained = _explain(url, phantom[k])
        shown = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#windows img")]
        assert shown == [f"data:image/png;base64,{w['png']}" for w in explained["windows"]]
    _screenshot(browser, tmp_path / "sequence-series.png")


def _batching(url: str) -> dict:
    return requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()["batching"]


def test_a_sequence_series_over_the_servers_limits_is_refused_before_sending(servers, browser, phantom, tmp_path):
    """A sequence checkpoint must read a series in one request: one file more than max_files is named, not sent."""
    url = servers["sequence"]
    extra = tmp_path / f"{PATIENT_LIKE}_extra.dcm"
    shutil.copyfile(phantom[0], extra)
    _open(browser, url)
    before = _batching(url)
    _choose(browser, [*phantom, extra])
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, WAIT_S).until(lambda d: error.is_displayed(), "the limit's message")
    assert f"{SLICES + 1} files, more than its {SEQUENCE_MAX_FILES} per request (serve max_files)" in error.text
    assert "sequence checkpoint" in error.text and "nothing was sent" in error.text
    assert _status(browser)["state"] == "error" and _batching(url) == before


def _without_uid(path: Path, out: Path) -> Path:
    ds = pydicom.dcmread(path)
    del ds.SOPInstanceUID
    ds.save_as(out)
    return out


def test_slices_without_a_sopinstanceuid_are_unmatched_not_shown_as_another(servers, browser, phantom, tmp_path):
    """A sequence checkpoint answers in slice order, which the page matches to its files by image id: two files
    without one cannot be told apart, so their slices show their bars and no image, and the status says so."""
    url = servers["sequence"]
    chosen = [_without_uid(p, tmp_path / f"{PATIENT_LIKE}_{k}.dcm") if k in (1, 4) else p for k, p in enumerate(phantom)]
    _open(browser, url)
    _choose(browser, [chosen[k] for k in (3, 0, 5, 1, 4, 2)])
    status = _wait_ready(browser, 0)
    assert "2 unmatched" in status["text"] and "2 hatched slices" in browser.find_element(By.ID, "strip-caption").text
    results = _predict_series(url, chosen)
    assert [x["image_id"] for x in results] == [_image_id(p) if k not in (1, 4) else "" for k, p in enumerate(phantom)]
    cells = browser.find_elements(By.CSS_SELECTOR, "#strip .cell")
    assert [c.get_attribute("data-unmatched") for c in cells] == [str(k in (1, 4)).lower() for k in range(SLICES)]

    cells[1].click()
    status = _wait(browser, lambda d: (s := _status(d))["state"] == "unmatched" and s["slice"] == "1" and s,
                   "slice 1 to be shown as unmatched")
    assert "no SOPInstanceUID" in status["text"]
    assert browser.find_elements(By.CSS_SELECTOR, "#windows img") == []
    assert browser.find_element(By.ID, "heatmap").get_attribute("data-subtype") == ""
    assert {label: float(b["probability"]) for label, b in _bars(browser).items()} == results[1]["probabilities"]

    cells[2].click()  # a matched slice still shows its own file's windows
    _wait_ready(browser, 2)
    shown = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#windows img")]
    assert shown == [f"data:image/png;base64,{w['png']}" for w in _explain(url, phantom[2])["windows"]]


def test_a_2_5d_slice_is_explained_between_its_neighbours(servers, browser, phantom):
    """For a 2.5D checkpoint the page sends the whole upload with `parts` naming the slice: its heat map is the one
    of the slice between its neighbours (as its bars), not of the slice alone (itself three times), and the server
    explains that one part only."""
    url = servers["wide"]
    chosen = [phantom[k] for k in (2, 0, 4, 1, 5, 3)]  # not in slice order: the server orders them
    _open(browser, url)
    assert requests.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()["neighbors"] == 1
    before = _batching(url)["explain_images"]
    _choose(browser, chosen)
    _wait_ready(browser, 0)
    k = 3  # phantom[1]: its neighbours phantom[0] and phantom[2] are in the upload
    browser.find_elements(By.CSS_SELECTOR, "#strip .cell")[k].click()
    status = _wait_ready(browser, k)
    assert _batching(url)["explain_images"] - before == 2  # slices 0 and k, one part each

    files = [("files", (f"s{i}.dcm", p.read_bytes(), "application/dicom")) for i, p in enumerate(chosen)]
    together = requests.post(f"{url}/v1/explain", files=files, headers=AUTH, timeout=60).json()["results"][k]
    alone = _explain(url, chosen[k])
    assert status["imageId"] == together["image_id"] == alone["image_id"] == _image_id(phantom[1])
    assert {label: float(b["probability"]) for label, b in _bars(browser).items()} == \
        _predict_series(url, chosen)[k]["probabilities"]
    browser.find_element(By.ID, "opacity").send_keys(Keys.END)  # the heat map alone
    window = together["windows"][0]["name"]
    canvas = _drawn(browser, "any", window, 1.0)
    _assert_canvas_matches(canvas, _expected_canvas(together, "any", window, 1.0, canvas.shape[0]), "among neighbours")
    wrong = np.abs(canvas[..., :3].astype(np.float32) - _expected_canvas(alone, "any", window, 1.0, canvas.shape[0]))
    assert wrong.mean() > 5, wrong.mean()  # the check can fail: the slice alone has another heat map
