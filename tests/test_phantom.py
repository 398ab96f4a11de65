"""raysys.phantom: synthetic head-CT studies, checked through the same readers as RSNA data."""

from __future__ import annotations

import io
import re

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

from raysys.dicom import DicomDecodeError, read_dicom
from raysys.labels import LABELS, read_labels
from raysys.presets import dicom_to_image
from raysys.synthetic import phantom

SIZE = 128  # small slices keep the suite fast; geometry is in mm, so anatomy scales
SUBTYPES = [name for name in LABELS if name != "any"]
# Far above RSNA so that 16 studies hold every subtype, epidural included.
BLEEDY = {
    "epidural": 0.03,
    "intraparenchymal": 0.1,
    "intraventricular": 0.1,
    "subarachnoid": 0.1,
    "subdural": 0.1,
    "any": 0.3,
}
NO_BLEEDS = {name: 0.0 for name in LABELS}


def _config(**overrides) -> phantom.PhantomConfig:
    return phantom.PhantomConfig(**{"studies": 16, "size": SIZE, "seed": 3, "prevalence": BLEEDY, **overrides})


@pytest.fixture(scope="module")
def bleeding(tmp_path_factory):
    out = tmp_path_factory.mktemp("bleeding")
    return out, phantom.write_dataset(out, _config())


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """The same studies (ids, anatomy, noise) without any bleed."""
    out = tmp_path_factory.mktemp("twin")
    return out, phantom.write_dataset(out, _config(prevalence=NO_BLEEDS))


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    """The bleeding dataset again, with file quirks injected."""
    out = tmp_path_factory.mktemp("quirky")
    return out, phantom.write_dataset(out, _config(quirks=True))


@pytest.fixture(scope="module")
def big_plan():
    return phantom.plan_dataset(phantom.PhantomConfig(studies=2000, seed=11))


def _hu(path) -> np.ndarray:
    return read_dicom(path)[0]


def _interior(hu: np.ndarray) -> np.ndarray:
    """Pixels enclosed by bone (>= 300 HU) and at least 2 pixels away from it: the brain, roughly."""
    soft = (hu < 300).astype(np.uint8)
    _, parts = cv2.connectedComponents(soft, connectivity=4)
    enclosed = (parts != parts[0, 0]) & (soft == 1)
    return cv2.erode(enclosed.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


# --- files, labels, headers ----------------------------------------------------------------------


def test_rsna_layout_and_labels(bleeding):
    out, frame = bleeding
    names = sorted(p.name for p in (out / "dicoms").iterdir())
    assert names == sorted(f"{image}.dcm" for image in frame.index)
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}\.dcm", name) for name in names)
    assert list(frame.columns) == [*LABELS, "patient_id", "study_id", "series_id", "z", "path", "quirk"]
    assert (frame["quirk"] == "").all()
    labels = read_labels(out / "labels.csv")
    pd.testing.assert_frame_equal(labels.sort_index(), frame[list(LABELS)].sort_index())
    planned = phantom.plan_dataset(_config())
    pd.testing.assert_frame_equal(frame.drop(columns="path"), planned)


def test_headers_look_like_rsna(bleeding):
    _, frame = bleeding
    for _, series in frame.groupby("series_id"):
        series = series.sort_values("z")
        np.testing.assert_allclose(np.diff(series["z"]), phantom.SLICE_GAP_MM)
        image_id = series.index[0]
        hu, meta = read_dicom(series["path"].iloc[0])
        assert hu.shape == (SIZE, SIZE)
        assert meta.image_id == image_id
        assert re.fullmatch(r"ID_[0-9a-f]{8}", meta.patient_id) and meta.patient_id == series["patient_id"].iloc[0]
        assert re.fullmatch(r"ID_[0-9a-f]{10}", meta.study_id) and meta.study_id == series["study_id"].iloc[0]
        assert re.fullmatch(r"ID_[0-9a-f]{10}", meta.series_id)
        assert meta.z == pytest.approx(series["z"].iloc[0], abs=1e-3)
        assert meta.pixel_spacing == pytest.approx((250 / SIZE, 250 / SIZE))
        assert meta.window_center in (40, 36, 30) and meta.window_width == 80
        ds = pydicom.dcmread(series["path"].iloc[0])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
        assert (ds.Modality, ds.PhotometricInterpretation) == ("CT", "MONOCHROME2")
        assert (ds.SamplesPerPixel, ds.BitsAllocated) == (1, 16)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
        assert ds.BitsStored in (12, 16) and ds.HighBit == ds.BitsStored - 1
        assert ds.PixelRepresentation == (1 if ds.BitsStored == 16 else 0)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    small = dict(studies=2, size=64, quirks=False)
    first = phantom.write_dataset(tmp_path / "a", _config(**small))
    again = phantom.write_dataset(tmp_path / "b", _config(**small))
    other = phantom.write_dataset(tmp_path / "c", _config(**small, seed=4))
    assert list(first.index) == list(again.index)
    for image in first.index:
        name = f"{image}.dcm"
        assert (tmp_path / "a" / "dicoms" / name).read_bytes() == (tmp_path / "b" / "dicoms" / name).read_bytes()
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (tmp_path / "b" / "labels.csv").read_bytes()
    assert not set(first.index) & set(other.index)
    assert _hu(first["path"].iloc[0]).tobytes() != _hu(other["path"].iloc[0]).tobytes()


def test_refuses_to_mix_with_another_dataset(tmp_path):
    phantom.write_dataset(tmp_path, _config(studies=1, size=64))
    phantom.write_dataset(tmp_path, _config(studies=1, size=64))  # the same dataset again is fine
    with pytest.raises(FileExistsError, match="another dataset"):
        phantom.write_dataset(tmp_path, _config(studies=1, size=64, seed=5))


# --- labels: prevalence, any, adjacency --------------------------------------------------------


def test_per_slice_prevalence_is_rsna_like(big_plan):
    observed = big_plan[list(LABELS)].mean()
    for name in LABELS:
        expected = phantom.RSNA_PREVALENCE[name]
        assert abs(observed[name] - expected) <= 0.15 * expected + 0.002, (name, observed[name], expected)


def test_any_is_the_or_of_subtypes(big_plan, bleeding):
    for frame in (big_plan, bleeding[1]):
        np.testing.assert_array_equal(frame["any"].to_numpy(), frame[SUBTYPES].max(axis=1).to_numpy())


def test_each_bleed_spans_adjacent_slices(big_plan):
    ordered = big_plan.sort_values(["series_id", "z"])
    new_series = (ordered["series_id"] != ordered["series_id"].shift()).to_numpy()
    runs = []
    for name in SUBTYPES:
        on = ordered[name].to_numpy() == 1
        starts = on & (new_series | ~np.roll(on, 1))
        run_id = np.cumsum(starts)[on]
        runs.append(np.bincount(run_id)[1:])
    runs = np.concatenate(runs)
    assert len(runs) > 100
    assert runs.min() >= 2


# --- pixels ------------------------------------------------------------------------------------


def test_anatomy_hu_ranges(twin):
    _, frame = twin
    yy, xx = np.mgrid[:SIZE, :SIZE]
    outside_circle = (yy - (SIZE - 1) / 2) ** 2 + (xx - (SIZE - 1) / 2) ** 2 > (SIZE / 2) ** 2
    padded = []
    for path in frame["path"]:
        hu = _hu(path)
        assert hu[SIZE // 2, 0] == -1024  # air beside the head, inside the scan circle
        outside = np.unique(hu[outside_circle])
        assert len(outside) == 1 and outside[0] in (-1024, -2000)
        padded.append(outside[0] == -2000)
        assert (hu > 700).sum() >= 100  # the skull ring
        assert hu.max() <= 1600
        brain = _interior(hu)
        assert brain.sum() >= 100  # a vertex slice at 128 pixels holds a few hundred
        assert 20 <= np.median(hu[brain]) <= 45
    assert any(padded) and not all(padded)


def test_bleeds_change_only_labelled_slices(bleeding, twin):
    _, frame = bleeding
    for image, row in frame.iterrows():
        rise = _hu(row["path"]) - _hu(twin[1].at[image, "path"])
        if row["any"]:
            assert (rise >= 5).sum() >= 10, image
        else:
            assert not rise.any(), image


def test_bleed_pixels_lie_in_hemorrhage_range(bleeding, twin):
    _, frame = bleeding
    assert frame[SUBTYPES].any().all()  # every subtype is exercised
    strong = []
    for image, row in frame[frame["any"] == 1].iterrows():
        hu, before = _hu(row["path"]), _hu(twin[1].at[image, "path"])
        soft = (before > -50) & (before < 100)  # was brain or CSF, not bone partial volume
        bright = np.percentile(hu[soft & (hu - before >= 5)], 90)
        assert 50 <= bright <= 105, (image, bright)  # visible in the brain window; 50-90 HU plus noise
        strong.append(hu[soft & (hu - before >= 20)])
    values = np.concatenate(strong)
    assert 50 <= np.median(values) <= 90
    assert np.mean((values >= 45) & (values <= 95)) >= 0.9


def test_normal_anatomy_also_has_dense_pixels(bleeding, twin):
    """Falx, sinus and calcifications reach blood density: the brightest brain pixel is no perfect classifier."""
    _, frame = bleeding
    peaks, dense = [], []
    for image, row in frame.iterrows():
        hu = _hu(row["path"])
        brain = _interior(_hu(twin[1].at[image, "path"]))
        peaks.append(hu[brain].max())
        dense.append(((hu >= 55) & (hu <= 90) & brain).sum())
    peaks, dense, positive = np.array(peaks), np.array(dense), frame["any"].to_numpy() == 1
    pos, neg = peaks[positive], peaks[~positive]
    auc = np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :])
    assert 0.5 < auc < 0.97
    assert np.mean(dense[~positive] >= 3) >= 0.2


# --- quirks ------------------------------------------------------------------------------------


def test_quirk_files(quirky, bleeding):
    out, frame = quirky
    plain = bleeding[1]
    assert list(frame.index) == list(plain.index)
    counts = frame["quirk"].value_counts()
    assert {name: counts.get(name, 0) for name in phantom.QUIRKS} == {name: 2 for name in phantom.QUIRKS}
    for image, row in frame[frame["quirk"] != ""].iterrows():
        quirk, expected = row["quirk"], _hu(plain.at[image, "path"])
        if quirk == "truncated":
            with pytest.raises(DicomDecodeError, match="pixel data is"):
                read_dicom(row["path"])
            continue
        hu, meta = read_dicom(row["path"])
        ds = pydicom.dcmread(row["path"])
        if quirk == "wrapped_intercept":
            assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (12, 0, 0.0)
            assert meta.wrapped_intercept_fixed
            np.testing.assert_array_equal(hu, np.maximum(expected, -1000))  # 12 bits hold -1000..3095
        elif quirk == "signed":
            assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (16, 1, 0.0)
            assert ds.pixel_array.dtype == np.int16
            np.testing.assert_array_equal(hu, expected)
        elif quirk == "size":
            assert hu.shape[0] != hu.shape[1] and hu.shape != (SIZE, SIZE)
            assert hu[hu.shape[0] // 2, 0] == -1024 and (hu > 700).sum() >= 100
            assert 20 <= np.median(hu[_interior(hu)]) <= 45
        else:  # duplicate_rows: the file itself is clean
            np.testing.assert_array_equal(hu, expected)


def test_labels_csv_duplicates_are_exact(quirky):
    out, frame = quirky
    raw = pd.read_csv(out / "labels.csv", dtype={"ID": str})
    duplicated = raw[raw.duplicated(keep="first")]
    repeated_images = set(duplicated["ID"].str.rsplit("_", n=1).str[0])
    assert repeated_images == set(frame.index[frame["quirk"] == "duplicate_rows"])
    assert len(duplicated) == len(repeated_images) * len(LABELS)
    assert len(raw) == (len(frame) + len(repeated_images)) * len(LABELS)
    labels = read_labels(out / "labels.csv")  # drops them; the truncated files keep their rows
    pd.testing.assert_frame_equal(labels.sort_index(), frame[list(LABELS)].sort_index())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"studies": 0}, "studies"),
        ({"slices_per_study": (1, 3)}, "slices_per_study"),
        ({"size": 32}, "size"),
        ({"scan_circle_padding": 1.5}, "scan_circle_padding"),
        ({"prevalence": {"any": 0.1}}, "prevalence must give"),
        ({"prevalence": {**phantom.RSNA_PREVALENCE, "any": 0.25}}, "exceeds the sum"),
        ({"prevalence": {**BLEEDY, "any": 0.9}}, "needs more bleeding slices"),
        ({"prevalence": {**NO_BLEEDS, "subdural": 0.1}}, "'any' is 0"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        phantom.PhantomConfig(**overrides)


def test_quirks_need_enough_images():
    with pytest.raises(ValueError, match="quirks need"):
        phantom.plan_dataset(phantom.PhantomConfig(studies=1, slices_per_study=4, quirks=True))


# --- masks (PhantomConfig(masks=True)) ----------------------------------------------------------


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """The quirky dataset again, with its masks."""
    out = tmp_path_factory.mktemp("masked")
    return out, phantom.write_dataset(out, _config(quirks=True, masks=True))


@pytest.fixture(scope="module")
def quirky_twin(tmp_path_factory):
    """The quirky dataset without any bleed: the same files, sizes and storage where nothing bleeds."""
    out = tmp_path_factory.mktemp("quirky_twin")
    return out, phantom.write_dataset(out, _config(quirks=True, prevalence=NO_BLEEDS))


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), disc).astype(bool)


def test_masks_leave_dicoms_and_labels_unchanged(tmp_path):
    small = dict(studies=3, size=64, quirks=True, quirk_files=1)
    plain = phantom.write_dataset(tmp_path / "plain", _config(**small))
    masked = phantom.write_dataset(tmp_path / "masked", _config(**small, masks=True))
    phantom.write_dataset(tmp_path / "again", _config(**small, masks=True))
    pd.testing.assert_frame_equal(plain.drop(columns="path"), masked.drop(columns="path"))
    assert plain["any"].any() and (plain["quirk"] == "size").any()
    for image in plain.index:
        name = f"{image}.dcm"
        assert (tmp_path / "plain" / "dicoms" / name).read_bytes() == (tmp_path / "masked" / "dicoms" / name).read_bytes()
        npz = f"{image}.npz"
        assert (tmp_path / "masked" / "masks" / npz).read_bytes() == (tmp_path / "again" / "masks" / npz).read_bytes()
    assert (tmp_path / "plain" / "labels.csv").read_bytes() == (tmp_path / "masked" / "labels.csv").read_bytes()
    assert not (tmp_path / "plain" / "masks").exists()
    assert sorted(p.stem for p in (tmp_path / "masked" / "masks").iterdir()) == sorted(plain.index)
    with pytest.raises(FileNotFoundError, match=r"masks=True"):
        phantom.read_masks(tmp_path / "plain", plain.index[0])


def test_masks_mark_the_bleeds_pixels(masked, quirky_twin):
    """Inside each subtype's mask the decoded HU rose against the bleed-free twin; what rose lies in the masks."""
    _, frame = masked
    assert frame[SUBTYPES].any().all() and (frame["quirk"] == "size").any()
    strong_outside, strong = 0, 0
    for image, row in frame[frame["quirk"] != "truncated"].iterrows():
        masks = phantom.read_masks(masked[0], image)
        bleeding = [name for name in SUBTYPES if row[name]]
        assert list(masks) == ([*bleeding, "any"] if bleeding else []) + [phantom.HEAD_MASK], image
        hu = _hu(row["path"])
        rise = hu - _hu(quirky_twin[1].at[image, "path"])
        assert all(m.shape == hu.shape and m.dtype == bool for m in masks.values()), (image, row["quirk"])
        if not bleeding:
            continue
        for name in bleeding:
            inside = rise[masks[name]]
            assert inside.size >= 5, (image, name)
            assert np.mean(inside >= 3) >= 0.85 and np.median(inside) >= 15, (image, name)
        np.testing.assert_array_equal(masks["any"], np.logical_or.reduce([masks[name] for name in bleeding]))
        # Pixels that rose by >= 15 HU lie in the bleed or on its one-pixel partial-volume rim (SAH's soft
        # sector edges spread a little further).
        clear = rise >= 15
        strong += clear.sum()
        strong_outside += (clear & ~_dilate(masks["any"], 1)).sum()
    assert strong_outside <= 0.02 * strong, (strong_outside, strong)


def test_head_mask_is_inside_the_skull(masked):
    _, frame = masked
    for image, row in frame[frame["quirk"] != "truncated"].iterrows():
        hu, head = _hu(row["path"]), phantom.read_masks(masked[0], image)[phantom.HEAD_MASK]
        core = cv2.erode(head.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert core.sum() >= 100 and not (hu[core] >= 300).any(), image  # no bone one pixel inside the edge
        ring = _dilate(head, 2) & ~head
        assert np.mean(hu[ring] >= 300) >= 0.95, image  # the inner table surrounds it
        assert head[_interior(hu)].all(), image


@pytest.mark.parametrize("size", [50, 96])
def test_mask_to_input_matches_the_image_geometry(masked, size):
    """A mask written as a DICOM's pixels (1000 HU on 0) and read by presets.dicom_to_image lands where
    mask_to_input puts it: uint8 = 255 x the input pixel's mask share, on square and odd-shaped slices."""
    out, frame = masked
    for image in [*frame.index[(frame["any"] == 1) & (frame["quirk"] == "")][:3], *frame.index[frame["quirk"] == "size"]]:
        ds = pydicom.dcmread(frame.at[image, "path"])
        mask = phantom.read_masks(out, image)[phantom.HEAD_MASK if frame.at[image, "quirk"] else "any"]
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 16, 15, 0, "0"
        ds.PixelData = (mask.astype("<u2") * 1000).tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        shown = dicom_to_image(buffer.getvalue(), "500/1000", size)[0][0].astype(int)  # (size, size) 0..255
        if frame.at[image, "quirk"]:
            assert mask.shape[0] > mask.shape[1]  # padded left and right on the input grid
        half, touched = phantom.mask_to_input(mask, size, min_share=0.5), phantom.mask_to_input(mask, size)
        assert half.shape == touched.shape == (size, size) and half.sum() >= 5
        assert (shown[half] >= 127).all() and (shown[~half] <= 128).all()
        assert touched[shown > 0].all() and touched[shown == 0].sum() <= 0.02 * touched.sum()
