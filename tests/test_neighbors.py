"""2.5D input: each image carries its series' neighbouring slices as extra channels, end to end."""

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from raysys import data as rdata
from raysys.config import Config, DataConfig
from raysys.engine import embed, infer
from raysys.labels import LABELS
from raysys.model import STATE_FILE, _backbone_of, build_model, load_checkpoint, read_meta, read_state, save_checkpoint
from raysys.predict import predict_folder
from raysys.presets import dicom_to_image
from raysys.testing import PROCESS_ATOL, settle_batchnorm, small_phantom
from raysys.train import fit

WINDOWS = "brain,subdural,soft_tissue"


def _frame() -> pd.DataFrame:
    rows = [("a3", "A", 20.0), ("a1", "A", 5.0), ("a0", "A", 0.0), ("a4", "A", 25.0), ("a2", "A", 10.0),  # gap: 15
            ("c0", "C", 7.0), ("n1", "", 3.0)]
    return pd.DataFrame([{"image_id": i, "series_id": s, "position": p, "path": f"/d/{i}.dcm"} for i, s, p in rows])


def test_neighbour_paths_stop_at_the_series_ends_and_at_gaps():
    frame = _frame()
    got = dict(zip(frame["image_id"], rdata.neighbor_paths(frame, frame, 1)))
    names = {k: [p.removeprefix("/d/").removesuffix(".dcm") for p in v] for k, v in got.items()}
    # Written out by hand: the slice itself past an end or across the gap between a2 (10) and a3 (20).
    assert names == {"a0": ["a0", "a0", "a1"], "a1": ["a0", "a1", "a2"], "a2": ["a1", "a2", "a2"],
                     "a3": ["a3", "a3", "a4"], "a4": ["a3", "a4", "a4"], "c0": ["c0", "c0", "c0"],
                     "n1": ["n1", "n1", "n1"]}
    two = rdata.neighbor_paths(frame[frame["image_id"] == "a1"], frame, 2)[0]
    assert [p.removeprefix("/d/").removesuffix(".dcm") for p in two] == ["a1", "a0", "a1", "a2", "a1"]


def test_neighbors_are_validated():
    with pytest.raises(ValueError, match="data.neighbors"):
        DataConfig(neighbors=-1)
    with pytest.raises(ValueError, match="data.neighbors"):
        DataConfig(neighbors=9)


def _widened_pair(size: int = 96):
    """A three-channel network and the 2.5D one built from the same backbone, with the same head."""
    torch.manual_seed(0)
    backbone = _backbone_of(build_model(image_size=size).state_dict(), "test")
    narrow, wide = build_model(backbone, image_size=size), build_model(backbone, image_size=size, neighbors=1)
    wide.net.fc.load_state_dict(narrow.net.fc.state_dict())
    return narrow.eval(), wide.eval()


def test_a_repeated_slice_through_the_widened_network_gives_the_three_channel_output():
    narrow, wide = _widened_pair()
    assert wide.net.Conv2d_1a_3x3.conv.in_channels == 9 and wide.contract.channels == 9
    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    cpu = torch.device("cpu")
    # Logits: an untrained network's probabilities are all 0 or 1 and would hide a difference.
    _, narrow_logits = embed(narrow, x, cpu)
    _, wide_logits = embed(wide, torch.cat([x, x, x], dim=1), cpu)
    np.testing.assert_allclose(wide_logits, narrow_logits, rtol=1e-4)
    # and the neighbours do count: other slices around the same one change the answer
    other = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    _, mixed_logits = embed(wide, torch.cat([other, x, other], dim=1), cpu)
    assert not np.allclose(mixed_logits, narrow_logits, rtol=1e-2)


def test_a_2_5d_checkpoint_records_its_neighbours_and_loads_the_same_network(tmp_path):
    _, wide = _widened_pair()
    save_checkpoint(tmp_path, wide, config={"data": {"windows": WINDOWS}}, epoch=1, metrics={})
    meta = read_meta(tmp_path)
    assert meta["neighbors"] == 1 and meta["contract"]["channels"] == 9 and len(meta["contract"]["mean"]) == 9
    loaded = load_checkpoint(tmp_path).model
    assert loaded.state_dict().keys() == wide.state_dict().keys()
    for name, tensor in wide.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name  # the widened convolution's weights included


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("neighbors")
    small_phantom(out, studies=4, size=96, seed=21)
    return out


@pytest.mark.slow
def test_2_5d_images_are_each_slice_between_its_neighbours(ray_session, phantom):
    found = rdata.scan(str(phantom / "dicoms"), str(phantom / "labels.csv"), training=True)
    rows = found.index.iloc[::2]  # every other slice: the rest are still there as neighbours
    got = rdata.image_dataset(rows, found, windows=WINDOWS, size=80, neighbors=1).to_pandas()
    # Independent order: each series by the InstanceNumber the phantom wrote.
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in found.index["path"]}
    series = {}
    for path, h in sorted(headers.items(), key=lambda ph: (str(ph[1].SeriesInstanceUID), int(ph[1].InstanceNumber))):
        series.setdefault(str(h.SeriesInstanceUID), []).append(path)
    by_id = {str(h.SOPInstanceUID): p for p, h in headers.items()}
    assert sorted(got["image_id"]) == sorted(rows["image_id"])
    for image_id, image, label in zip(got["image_id"], got["image"], got["label"]):
        path = by_id[image_id]
        members = series[str(headers[path].SeriesInstanceUID)]
        k = members.index(path)
        stack = [members[j] if 0 <= j < len(members) else path for j in (k - 1, k, k + 1)]
        want = np.concatenate([dicom_to_image(p, WINDOWS, 80)[0] for p in stack])
        assert np.array_equal(np.asarray(image), want), image_id
        truth = rows.set_index("image_id").loc[image_id, list(LABELS)].to_numpy(np.float32)
        assert np.array_equal(np.asarray(label), truth)


@pytest.fixture(scope="module")
def wide_checkpoint(ray_session, phantom, tmp_path_factory):
    """A 2.5D CNN trained for two short epochs, its BatchNorm statistics then those of the phantom's own stacks:
    six training steps leave them near their initial values (see raysys.testing.settle_batchnorm)."""
    cfg = Config().replace(**{
        "data.data": str(phantom / "dicoms"), "data.labels": str(phantom / "labels.csv"), "data.image_size": 80,
        "data.val_fraction": 0.3, "data.neighbors": 1, "model.weights": "none", "train.epochs": 2,
        "train.batch_size": 4, "train.workers": 1, "train.storage_path": str(tmp_path_factory.mktemp("wide")),
        "train.name": "wide",
    })
    best = fit(cfg).best_checkpoint
    stacks = _series_stacks(sorted((phantom / "dicoms").rglob("*.dcm")))
    state = read_state(best)
    state["model"] = settle_batchnorm(load_checkpoint(best).model, np.stack(list(stacks.values()))).state_dict()
    torch.save(state, Path(best) / STATE_FILE)
    return best


def _series_stacks(paths) -> dict[str, np.ndarray]:
    """Independent 2.5D input per image id: each series ordered by InstanceNumber, ends repeat the slice."""
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in paths}
    series = {}
    for path, h in sorted(headers.items(), key=lambda ph: (str(ph[1].SeriesInstanceUID), int(ph[1].InstanceNumber))):
        series.setdefault(str(h.SeriesInstanceUID), []).append(path)
    out = {}
    for members in series.values():
        images = [dicom_to_image(p, WINDOWS, 80)[0] for p in members]
        for k, path in enumerate(members):
            stack = [images[j] if 0 <= j < len(members) else images[k] for j in (k - 1, k, k + 1)]
            out[str(headers[path].SOPInstanceUID)] = np.concatenate(stack)
    return out


@pytest.mark.slow
def test_predict_builds_the_2_5d_input_the_checkpoint_records(phantom, wide_checkpoint):
    meta = read_meta(wide_checkpoint)
    assert meta["neighbors"] == 1 and meta["contract"]["channels"] == 9
    preds = predict_folder(wide_checkpoint, str(phantom / "dicoms"), progress=False)
    stacks = _series_stacks(sorted((phantom / "dicoms").rglob("*.dcm")))
    assert sorted(preds.frame["image_id"]) == sorted(stacks)
    model = load_checkpoint(wide_checkpoint).model
    frame = preds.frame.set_index("image_id")
    want = infer(model, np.stack([stacks[i] for i in frame.index]), torch.device("cpu"))
    np.testing.assert_allclose(frame[list(LABELS)].to_numpy(), want, atol=PROCESS_ATOL)


@pytest.mark.slow
def test_serve_builds_the_same_2_5d_input_from_the_request(phantom, wide_checkpoint):
    import requests
    from ray import serve

    from raysys.serve import build_app
    from raysys.testing import free_port

    paths = sorted((phantom / "dicoms").rglob("*.dcm"))
    one_series = [p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID ==
                  pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID]
    stacks = _series_stacks(one_series)
    model, cpu = load_checkpoint(wide_checkpoint).model, torch.device("cpu")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(wide_checkpoint), name="wide", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/predict"
        shuffled = one_series[::-1]  # parts out of slice order: the service orders them itself
        files = [("file", (f"s{i}.dcm", p.read_bytes(), "application/dicom")) for i, p in enumerate(shuffled)]
        answer = requests.post(url, files=files, timeout=60).json()["results"]
        got = np.array([[r["probabilities"][name] for name in LABELS] for r in answer])
        inputs = np.stack([stacks[r["image_id"]] for r in answer])
        want = infer(model, inputs, cpu)
        np.testing.assert_allclose(got, want, atol=PROCESS_ATOL)
        swapped = np.concatenate([inputs[:, 6:], inputs[:, 3:6], inputs[:, :3]], axis=1)  # next slice first
        assert np.abs(infer(model, swapped, cpu) - want).max(axis=1).min() > 10 * PROCESS_ATOL  # the check can fail
        lone = requests.post(url, data=shuffled[0].read_bytes(), headers={"Content-Type": "application/dicom"},
                             timeout=60).json()
        image = dicom_to_image(shuffled[0], WINDOWS, 80)[0]
        want_lone = infer(model, np.concatenate([image, image, image])[None], cpu)[0]
        np.testing.assert_allclose([lone["probabilities"][name] for name in LABELS], want_lone, atol=PROCESS_ATOL)
    finally:
        serve.shutdown()


def test_a_cache_cannot_feed_2_5d_input(tmp_path):
    (tmp_path / rdata.CACHE_MARKER).write_text("{}")
    with pytest.raises(rdata.DataError, match="2.5D"):
        rdata.image_dataset(_frame(), str(tmp_path), neighbors=1)


def test_serve_stacks_slices_without_ids_by_position_and_leaves_those_without_a_place_alone():
    """Eleven parts of one series without SOPInstanceUIDs, sent in reverse: each between the parts at the positions
    next to its own. Without a position a slice has no place in its series (raysys.data.order_series) and stands
    alone, itself repeated, as in training."""
    from raysys.serve import _stack_neighbors

    def middles(decoded):
        return [tuple(int(v) for v in s[::3, 0, 0]) for s in _stack_neighbors(decoded, 1)]

    placed = [(np.full((3, 2, 2), k, np.uint8), "", "series", float(k), float(k)) for k in range(11)][::-1]
    assert middles(placed) == [(max(k - 1, 0), k, min(k + 1, 10)) for k in range(11)][::-1]
    unplaced = [(np.full((3, 2, 2), k, np.uint8), "", "series", float("nan"), float("nan")) for k in range(11)]
    assert middles(unplaced) == [(k, k, k) for k in range(11)]
    # Part 5 has only an InstanceNumber (a count, no z) among slices placed in mm: alone, and not a neighbour; the
    # mm slices see a gap where it would be (a step of 2 mm in a series of 1 mm steps).
    mixed = [(image, uid, series, position, float("nan") if k == 5 else z)
             for k, (image, uid, series, position, z) in enumerate(placed[::-1])]
    expected = [(max(k - 1, 0), k, min(k + 1, 10)) for k in range(11)]
    expected[4], expected[5], expected[6] = (3, 4, 4), (5, 5, 5), (6, 6, 7)
    assert middles(mixed) == expected
