"""Ray Data pipeline on a real local Ray with phantom studies (quirks and one truncated file)."""

import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import ray

from raysys import data as rdata
from raysys import storage
from raysys.augment import image_seed
from raysys.config import AugmentConfig, DataConfig
from raysys.dicom import read_dicom
from raysys.labels import LABELS
from raysys.synthetic import DENSE_PREVALENCE, PhantomConfig, write_dataset
from raysys.windowing import parse_windows, window_stack

SIZE = 96


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    # Prevalence raised so a few dozen slices hold positives of every kind.
    cfg = PhantomConfig(studies=8, slices_per_study=(8, 10), size=128, seed=3, quirks=True, quirk_files=1,
                        prevalence=DENSE_PREVALENCE)
    frame = write_dataset(out, cfg)
    return out, frame


@pytest.fixture(scope="module")
def scanned(ray_session, phantom, tmp_path_factory):
    out, _ = phantom
    run_dir = tmp_path_factory.mktemp("run")
    return rdata.scan(str(out / "dicoms"), str(out / "labels.csv"), max_error_fraction=0.05, run_dir=run_dir), run_dir


def test_scan_counts_good_images_and_records_the_truncated_file(phantom, scanned):
    _, frame = phantom
    found, run_dir = scanned
    truncated = frame.index[frame["quirk"] == "truncated"]
    assert len(truncated) == 1
    assert found.total == len(frame)
    assert list(found.errors["image_id"]) == list(truncated)
    assert "the file is cut short" in found.errors["reason"].iloc[0]  # "pixel data is N bytes, its element declares M"
    written = pd.read_csv(run_dir / "errors.csv")
    assert list(written["image_id"]) == list(truncated) and list(written.columns) == rdata.ERROR_COLUMNS
    # Every good image is indexed with its labels and header fields; the bad one is not.
    good = frame.drop(index=truncated)
    assert sorted(found.index.index) == sorted(good.index)
    assert (found.index.loc[good.index, list(LABELS)].to_numpy() == good[list(LABELS)].to_numpy()).all()
    assert (found.index.loc[good.index, "patient_id"] == good["patient_id"]).all()


def test_too_many_errors_fail_the_run_with_a_clear_message(ray_session, phantom):
    out, _ = phantom
    with pytest.raises(rdata.DataError, match="over max_error_fraction"):
        rdata.scan(str(out / "dicoms"), str(out / "labels.csv"), max_error_fraction=0.001)


def test_training_images_without_labels_are_an_error_inference_allows_them(ray_session, phantom, tmp_path):
    out, frame = phantom
    lines = (out / "labels.csv").read_text().splitlines()
    dropped = frame.index[0]
    (tmp_path / "partial.csv").write_text("\n".join(line for line in lines if not line.startswith(dropped)) + "\n")
    with pytest.raises(rdata.DataError, match=dropped):
        rdata.scan(str(out / "dicoms"), str(tmp_path / "partial.csv"), max_error_fraction=0.05)
    found = rdata.scan(str(out / "dicoms"), str(tmp_path / "partial.csv"), training=False, max_error_fraction=0.05)
    assert (found.index.loc[dropped, list(LABELS)] == -1).all()


def test_split_keeps_patients_whole_and_is_deterministic(scanned):
    index = scanned[0].index
    train, val = rdata.split_by_patient(index, val_fraction=0.25, seed=1)
    assert len(train) + len(val) == len(index)
    assert set(train["patient_id"]).isdisjoint(val["patient_id"])
    assert len(set(val["patient_id"])) >= 1
    again, _ = rdata.split_by_patient(index, val_fraction=0.25, seed=1)
    assert list(again.index) == list(train.index)
    folds = [rdata.split_by_patient(index, folds=4, fold=k, seed=2)[1] for k in range(4)]
    assert sum(len(f) for f in folds) == len(index)  # every image validates in exactly one fold
    patients = [set(f["patient_id"]) for f in folds]
    assert all(a.isdisjoint(b) for i, a in enumerate(patients) for b in patients[i + 1:])


def _patients(n_positive: int, n_negative: int, slices: int = 3) -> pd.DataFrame:
    """An index of whole patients: the first n_positive have a bleed on one slice each."""
    rows = []
    for p in range(n_positive + n_negative):
        for k in range(slices):
            bleed = int(p < n_positive and k == 1)
            rows.append({"image_id": f"ID_{p:03d}_{k}", "patient_id": f"P{p:03d}", "study_id": f"S{p:03d}",
                         **dict.fromkeys(LABELS, 0), "subdural": bleed, "any": bleed})
    return pd.DataFrame(rows).set_index("image_id", drop=False)


@pytest.mark.parametrize("n_positive", [2, 3, 7, 10])
@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.5])
def test_validation_gets_a_patient_with_a_bleed_whenever_two_have_one(n_positive, val_fraction):
    index = _patients(n_positive, 40)
    for seed in range(10):
        train, val = rdata.split_by_patient(index, val_fraction=val_fraction, seed=seed)
        assert set(train["patient_id"]).isdisjoint(val["patient_id"])
        assert val["any"].sum() >= 1 and train["any"].sum() >= 1, (seed, n_positive, val_fraction)
        assert not rdata.degenerate_validation(val)


@pytest.mark.parametrize("val_fraction", [0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.75, 0.9])
def test_validation_holds_round_val_fraction_of_the_patients(val_fraction):
    for n_positive, n_negative in ((0, 7), (3, 17), (1, 40), (8, 52)):
        index = _patients(n_positive, n_negative)
        n = n_positive + n_negative
        want = min(max(1, round(val_fraction * n)), n - 1)  # the documented share: at least one, never all
        for seed in range(3):
            train, val = rdata.split_by_patient(index, val_fraction=val_fraction, seed=seed)
            assert (val["patient_id"].nunique(), train["patient_id"].nunique()) == (want, n - want), (n, seed)
            assert set(train["patient_id"]).isdisjoint(val["patient_id"]) and len(train) + len(val) == len(index)
            again = rdata.split_by_patient(index, val_fraction=val_fraction, seed=seed)[1]
            assert list(again.index) == list(val.index)  # a pure function of (seed, val_fraction)


def test_a_single_patient_with_a_bleed_trains_and_validation_is_marked_degenerate():
    index = _patients(1, 20)
    for seed in range(5):
        train, val = rdata.split_by_patient(index, val_fraction=0.2, seed=seed)
        assert train["any"].sum() == 1 and val["any"].sum() == 0
        assert rdata.degenerate_validation(val)
    # k folds with fewer patients with a bleed than folds: the folds past them are degenerate, and say so.
    folds = [rdata.split_by_patient(_patients(3, 30), folds=5, fold=k, seed=0)[1] for k in range(5)]
    assert [rdata.degenerate_validation(f) for f in folds] == [False, False, False, True, True]


def test_split_falls_back_to_study_when_patient_id_is_empty(scanned):
    index = scanned[0].index.assign(patient_id="")
    train, val = rdata.split_by_patient(index, val_fraction=0.25, seed=1)
    assert set(train["study_id"]).isdisjoint(val["study_id"])


def test_a_slice_without_patient_id_stays_with_its_studys_patient():
    index = _patients(4, 16, slices=4)
    index.loc[index["image_id"].str.endswith(("_2", "_3")), "patient_id"] = ""  # half of every study anonymised
    for seed in range(5):
        train, val = rdata.split_by_patient(index, val_fraction=0.25, seed=seed)
        assert set(train["study_id"]).isdisjoint(val["study_id"])
        assert len(val) % 4 == 0 and len(val) > 0  # whole studies of four slices


def test_balance_ratio_and_redraw_per_epoch(scanned):
    index = scanned[0].index
    pos, neg = int((index["any"] == 1).sum()), int((index["any"] == 0).sum())
    assert 0 < pos < neg
    e1 = rdata.balance(index, epoch=1, seed=0, neg_ratio=1.0)
    assert (e1["any"] == 1).sum() == pos and (e1["any"] == 0).sum() == min(neg, pos)
    e2 = rdata.balance(index, epoch=2, seed=0, neg_ratio=1.0)
    assert set(e1.index) != set(e2.index)  # other negatives next epoch
    assert list(rdata.balance(index, epoch=1, seed=0).index) == list(e1.index)  # same (seed, epoch), same draw
    half = rdata.balance(index, epoch=1, seed=0, neg_ratio=0.5)
    assert (half["any"] == 0).sum() == round(0.5 * pos)


def _series_frame() -> pd.DataFrame:
    """Hand-made index rows: each series' expected order is written out below, not computed."""
    rows = [  # (image_id, series_id, position, folder)
        ("a3", "A", 20.0, "x"), ("a1", "A", 5.0, "y"), ("a0", "A", 0.0, "x"), ("a4", "A", 25.0, "y"),
        ("a2", "A", 10.0, "x"),  # 15 missing: a gap before a3
        ("b2", "B", 5.0, "x"), ("b1", "B", 5.0, "x"), ("b0", "B", 0.0, "x"), ("b3", "B", 10.0, "x"),
        ("c0", "C", 7.0, "x"),
        ("n1", "", 3.0, "x"), ("n2", "", 1.0, "x"),  # no SeriesInstanceUID: each its own series
        ("d1", "D", float("nan"), "x"), ("d0", "D", 2.0, "x"),  # no position: last in its series
    ]
    rows += [(f"e{i:03d}", "E", 2.5 * i, "x") for i in np.random.default_rng(0).permutation(120)]
    return pd.DataFrame([{"image_id": i, "series_id": s, "position": p, "path": f"/{d}/{i}.dcm"} for i, s, p, d in rows])


def test_order_series_orders_each_series_and_marks_gaps_and_duplicates():
    ordered = order = rdata.order_series(_series_frame()).set_index("image_id")

    def series(name):
        return list(order[order["series_id"] == name].sort_values("slice").index)

    assert series("A") == ["a0", "a1", "a2", "a3", "a4"]  # from two folders, by position
    assert list(ordered.loc[["a0", "a1", "a2", "a3", "a4"], "gap_before"]) == [False, False, False, True, False]
    assert series("B") == ["b0", "b1", "b2", "b3"]  # equal positions: by image id
    assert list(ordered.loc[["b0", "b1", "b2", "b3"], "duplicate_position"]) == [False, True, True, False]
    assert not ordered.loc[["b0", "b1", "b2", "b3"], "gap_before"].any()
    assert ordered.loc["c0", ["slice", "series_slices"]].tolist() == [0, 1] and not ordered.loc["c0", "gap_before"]
    assert ordered.loc[["n1", "n2"], "slice"].tolist() == [0, 0] and ordered.loc[["n1", "n2"], "series_slices"].tolist() == [1, 1]
    assert series("D") == ["d0", "d1"]
    assert series("E") == [f"e{i:03d}" for i in range(120)] and not ordered.loc[series("E"), "gap_before"].any()
    assert (ordered.loc[series("E"), "series_slices"] == 120).all()


def test_slices_of_another_position_kind_no_position_or_the_same_position_are_not_neighbours():
    nan = float("nan")
    rows = [  # (image_id, series_id, position, z): no z = a position from InstanceNumber, a slice count
        ("f0", "F", 0.0, 0.0), ("f1", "F", 5.0, 5.0), ("f2", "F", 10.0, 10.0), ("f3", "F", 2.0, nan),  # mm, one count
        ("g0", "G", 1.0, nan), ("g1", "G", 2.0, nan), ("g2", "G", 3.0, nan), ("g3", "G", 2.5, 40.0),  # counts, one mm
        ("h0", "H", 0.0, 0.0), ("h1", "H", 5.0, 5.0), ("h1b", "H", 5.0, 5.0), ("h2", "H", 10.0, 10.0),  # one place twice
        ("k0", "K", 1.0, nan), ("k1", "K", 2.0, 2.0), ("k2", "K", nan, nan),  # as many of each kind: mm; no position
    ]
    frame = pd.DataFrame([{"image_id": i, "series_id": s, "position": p, "z": z, "path": f"/d/{i}.dcm"}
                          for i, s, p, z in rows])
    ordered = rdata.order_series(frame)
    assert list(ordered["image_id"]) == ["f0", "f1", "f2", "f3", "g0", "g1", "g2", "g3", "h0", "h1", "h1b", "h2",
                                         "k1", "k0", "k2"]
    isolated = set(ordered.loc[ordered["isolated"], "image_id"])
    assert isolated == {"f3", "g3", "k0", "k2"} and not ordered["gap_before"].any()
    got = {i: [Path(p).stem for p in stack] for i, stack in zip(frame["image_id"], rdata.neighbor_paths(frame, frame, 1))}
    # Written out by hand: an isolated slice is its own neighbours; h1 and h1b share a place and never stand for
    # each other (h1 stands for it, first by image id).
    assert got == {"f0": ["f0", "f0", "f1"], "f1": ["f0", "f1", "f2"], "f2": ["f1", "f2", "f2"], "f3": ["f3"] * 3,
                   "g0": ["g0", "g0", "g1"], "g1": ["g0", "g1", "g2"], "g2": ["g1", "g2", "g2"], "g3": ["g3"] * 3,
                   "h0": ["h0", "h0", "h1"], "h1": ["h0", "h1", "h2"], "h1b": ["h0", "h1b", "h2"],
                   "h2": ["h1", "h2", "h2"], "k0": ["k0"] * 3, "k1": ["k1"] * 3, "k2": ["k2"] * 3}
    two = rdata.neighbor_paths(frame[frame["image_id"] == "h1b"], frame, 2)[0]
    assert [Path(p).stem for p in two] == ["h1b", "h0", "h1b", "h2", "h1b"]


def test_scanned_series_follow_their_slices_and_a_failed_slice_leaves_a_gap(phantom, scanned):
    import pydicom

    _, frame = phantom
    found, _ = scanned
    ordered = rdata.order_series(found.index)
    truncated = frame.index[frame["quirk"] == "truncated"][0]
    series = frame.loc[truncated, "series_id"]
    rows = ordered[ordered["series_id"] == series].sort_values("slice")
    # Independent truth: the InstanceNumber each file was written with (the phantom tilts its gantry, so
    # ImagePositionPatient's z alone is not what orders the slices).
    instance = {i: int(pydicom.dcmread(frame.loc[i, "path"], stop_before_pixels=True).InstanceNumber)
                for i in frame.index[frame["series_id"] == series]}
    assert list(rows["image_id"]) == sorted((i for i in instance if i != truncated), key=instance.get)
    after = [i for i in sorted(instance, key=instance.get) if instance[i] == instance[truncated] + 1]
    assert rows.set_index("image_id")["gap_before"].to_dict() == {i: i in after for i in rows["image_id"]}


def test_series_dataset_groups_and_orders_in_ray_data(ray_session):
    import ray

    frame = _series_frame()
    frame["series_id"] = frame["series_id"].where(frame["series_id"] != "", "")
    got = rdata.series_dataset(ray.data.from_pandas(frame)).to_pandas().set_index("image_id")
    want = rdata.order_series(frame).set_index("image_id")
    assert sorted(got.index) == sorted(want.index)
    columns = ["slice", "series_slices", "gap_before", "duplicate_position"]
    assert got.loc[want.index, columns].astype(int).equals(want[columns].astype(int))


def test_balance_logit_offset_matches_the_odds_of_balanced_epochs(scanned):
    index = scanned[0].index
    offset = rdata.balance_logit_offset(index, neg_ratio=1.0)
    # Independently: the prevalence actually seen in balanced epochs vs in the whole training set.
    epochs = pd.concat([rdata.balance(index, epoch=e, seed=0) for e in range(20)])

    def logit(p):
        return np.log(p / (1 - p))

    for j, name in enumerate(LABELS):
        overall, seen = index[name].mean(), epochs[name].mean()
        if 0 < overall < 1:
            assert offset[j] == pytest.approx(logit(overall) - logit(seen), abs=1e-6)
        else:
            assert np.isfinite(offset[j])


def test_image_dataset_equals_direct_decoding(scanned):
    found = scanned[0]
    rows = found.index.iloc[:6]
    got = {r["image_id"]: r for r in rdata.image_dataset(rows, found, size=SIZE).take_all()}
    assert set(got) == set(rows.index)
    windows = parse_windows("brain,subdural,soft_tissue")
    for image_id, row in rows.iterrows():
        hu, _ = read_dicom(row["path"])
        expected = window_stack(hu, windows, SIZE)  # the core's own definition, applied to full HU
        assert got[image_id]["image"].shape == (3, SIZE, SIZE) and got[image_id]["image"].dtype == np.uint8
        assert np.abs(got[image_id]["image"].astype(int) - expected).max() <= 1
        assert np.array_equal(got[image_id]["label"], row[list(LABELS)].to_numpy(np.float32))


def test_a_file_gone_since_the_scan_stops_the_epoch_naming_it(ray_session, phantom, tmp_path):
    out, frame = phantom
    folder = tmp_path / "dicoms"
    folder.mkdir()
    for image_id in frame.index[frame["quirk"] == ""][:3]:
        (folder / f"{image_id}.dcm").write_bytes((out / "dicoms" / f"{image_id}.dcm").read_bytes())
    found = rdata.scan(str(folder), training=False)
    gone = found.index["path"].iloc[1]
    (folder / gone).unlink()
    with pytest.raises(Exception, match=re.escape(f"{gone}: no such file")):
        rdata.image_dataset(found.index, found, size=SIZE, with_labels=False).take_all()


def test_augmentation_is_reproducible_keeps_shape_and_range(scanned):
    found = scanned[0]
    rows = found.index.iloc[:8]
    cfg = AugmentConfig(hflip=1.0, vflip=0.0, rotate=1.0, salt_pepper=1.0, salt_pepper_amount=0.02, affine=0.5,
                        elastic=0.5)
    plain = {r["image_id"]: r["image"] for r in rdata.image_dataset(rows, found, size=SIZE).take_all()}

    def run(epoch):
        ds = rdata.augment_dataset(rdata.image_dataset(rows, found, size=SIZE), cfg, seed=0, epoch=epoch)
        return {r["image_id"]: r["image"] for r in ds.take_all()}

    a, b, c = run(1), run(1), run(2)
    for image_id, image in a.items():
        assert image.shape == (3, SIZE, SIZE) and image.dtype == np.uint8
        assert np.array_equal(image, b[image_id])  # same (seed, epoch): same pixels
        assert not np.array_equal(image, plain[image_id])
    assert any(not np.array_equal(a[i], c[i]) for i in a)  # another epoch: other draws
    # Salt and pepper alone: int(S^2 x 2%) pixels per image set to 0 or 255 in every channel (fewer change where
    # a pixel already was; phantom slices are mostly air and bone, at the window's ends).
    noise = AugmentConfig(hflip=0, vflip=0, rotate=0, affine=0, elastic=0, salt_pepper=1.0, salt_pepper_amount=0.02)
    for r in rdata.augment_dataset(rdata.image_dataset(rows, found, size=SIZE), noise, seed=0, epoch=1).take_all():
        changed = (r["image"] != plain[r["image_id"]]).any(axis=0)
        assert 0.5 * int(SIZE * SIZE * 0.02) < changed.sum() <= int(SIZE * SIZE * 0.02)
        values = r["image"][:, changed]
        assert set(np.unique(values)) <= {0, 255} and (values == values[:1]).all()


def test_device_augmentation_gets_each_images_seed_instead_of_augmented_pixels(scanned):
    found = scanned[0]
    rows = found.index.iloc[:6]
    plain = {r["image_id"]: r["image"] for r in rdata.image_dataset(rows, found, size=SIZE).take_all()}
    ds = rdata.augment_dataset(rdata.image_dataset(rows, found, size=SIZE), AugmentConfig(on="device"), seed=3, epoch=2)
    for r in ds.take_all():
        assert np.array_equal(r["image"], plain[r["image_id"]])
        assert r["aug_seed"] == image_seed(3, 2, r["image_id"])


def test_cache_round_trip_equals_direct_decoding(ray_session, phantom, scanned, tmp_path):
    out, frame = phantom
    found = scanned[0]
    cfg = DataConfig(data=str(out / "dicoms"), labels=str(out / "labels.csv"), image_size=SIZE,
                     max_error_fraction=0.05)
    stats = rdata.prepare(cfg, str(tmp_path / "cache"))
    assert stats["images"] == len(found.index) and stats["errors"] == 1
    assert stats["shards"] == len(list((tmp_path / "cache").glob("shard-*.parquet"))) == -(-stats["images"] // 256)
    assert stats["cache_bytes_per_image"] < stats["dicom_bytes_per_image"]
    assert rdata.is_cache(str(tmp_path / "cache"))
    cached = rdata.scan(str(tmp_path / "cache"), str(tmp_path / "cache" / "labels.csv"), max_error_fraction=0.05)
    assert cached.source == "cache"
    assert sorted(cached.index.index) == sorted(found.index.index)
    assert list(cached.errors["image_id"]) == list(found.errors["image_id"])
    direct = {r["image_id"]: r for r in rdata.image_dataset(found.index, found, size=SIZE).take_all()}
    # An epoch's subset, in a shuffled order: only those images come back, each equal to decoding it directly.
    rows = cached.index.sample(n=25, random_state=0)
    from_cache = {r["image_id"]: r for r in rdata.image_dataset(rows, cached, size=SIZE).take_all()}
    assert sorted(from_cache) == sorted(rows.index)
    for image_id, row in from_cache.items():
        assert np.array_equal(row["image"], direct[image_id]["image"])
        assert np.array_equal(row["label"], direct[image_id]["label"])
    # A whole epoch: every shard read whole and in order (its images handed on without a copy).
    whole = rdata.image_dataset(cached.index, cached, size=SIZE).take_all()
    assert [r["image_id"] for r in whole] == list(cached.index.index)
    assert all(np.array_equal(r["image"], direct[r["image_id"]]["image"]) for r in whole)
    with pytest.raises(rdata.DataError, match="cache holds"):
        rdata.image_dataset(rows, cached, size=SIZE + 32)


def test_cache_rows_are_taken_from_every_row_group_of_a_shard():
    """Shards are one row group since this layout; caches written before hold several (64 rows each)."""
    import pyarrow as pa

    shape = (2, 3, 3)
    images = np.random.default_rng(0).integers(0, 256, (10, *shape), dtype=np.uint8)
    width = images[0].size
    chunks = [pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(part), [None, pa.py_buffer(part.tobytes())])
              for part in (images[:4], images[4:5], images[5:])]
    column = pa.chunked_array(chunks)
    for rows in ([9, 0, 4, 5, 3], [4], list(range(10)), [7, 7, 2]):
        assert np.array_equal(rdata._take_images(column, np.array(rows), shape), images[rows])
    whole = pa.chunked_array([pa.concat_arrays(chunks)])
    taken = rdata._take_images(whole, np.arange(10), shape)
    assert np.array_equal(taken, images) and not taken.flags.owndata  # a view of the column: no copy
    assert np.array_equal(rdata._take_images(whole, np.array([3, 1]), shape), images[[3, 1]])


def test_a_file_cut_inside_its_header_is_an_error_row_not_a_failed_scan(ray_session, phantom, tmp_path):
    out, frame = phantom
    folder = tmp_path / "dicoms"
    folder.mkdir()
    good = list(frame.index[frame["quirk"] == ""][:4])
    for image_id in good:
        (folder / f"{image_id}.dcm").write_bytes((out / "dicoms" / f"{image_id}.dcm").read_bytes())
    whole = (out / "dicoms" / f"{good[0]}.dcm").read_bytes()
    (folder / "ID_cut.dcm").write_bytes(whole[:200])  # a partly copied file: cut inside an element header
    found = rdata.scan(str(folder), max_error_fraction=1.0, training=False)
    assert sorted(found.index.index) == sorted(good)
    (reason,) = found.errors["reason"]
    assert list(found.errors["image_id"]) == ["ID_cut"] and "ID_cut.dcm" in reason


def test_scan_lists_the_files_ray_data_would_read(ray_session, tmp_path):
    """scan lists a folder itself (to give its read tasks FILES_PER_TASK files each); the files it finds must be the
    ones Ray's own reader finds for the same folder: any-case extension, nested folders, and names Ray skips."""
    for name in ("a.dcm", "B.DCM", "sub/c.dcm", "sub/.d.dcm", ".hidden/e.dcm", "_skip/f.dcm", "_g.dcm", "h.txt",
                 "sub/deeper/i.Dcm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not a dicom")
    ours = sorted(storage.list_files(str(tmp_path), ".dcm"))
    rays = sorted(ray.data.read_binary_files(str(tmp_path), include_paths=True, file_extensions=["dcm"])
                  .select_columns(["path"]).to_pandas()["path"])
    assert ours == rays and len(ours) == 5
    found = rdata.scan(str(tmp_path), training=False, max_error_fraction=1.0)
    assert sorted(found.errors["path"]) == ours and found.index.empty  # every listed file scanned, each an error
    with pytest.raises(FileNotFoundError, match="nope: no such file or folder"):
        rdata.scan(str(tmp_path / "nope"), training=False)


# --- odd files: a phantom series edited by pydicom, and files that are not CT or named .DCM ------------------


@pytest.fixture(scope="module")
def odd(ray_session, phantom, tmp_path_factory):
    """One phantom series whose lowest slice (by InstanceNumber) has no position at all, whose highest has only its
    InstanceNumber, and whose middle slice is there twice (a copy under another SOPInstanceUID); beside it, from
    another series, an MR slice, a slice without Modality and one without SOPInstanceUID named ID_upper.DCM."""
    _, frame = phantom
    clean = frame[frame.groupby("series_id")["quirk"].transform(lambda q: (q == "").all())]
    first_series, other_series = clean["series_id"].unique()[:2]
    folder = tmp_path_factory.mktemp("odd")
    headers = {i: pydicom.dcmread(frame.loc[i, "path"]) for i in clean.index[clean["series_id"] == first_series]}
    order = sorted(headers, key=lambda i: int(headers[i].InstanceNumber))
    lowest, highest, middle = order[0], order[-1], order[len(order) // 2]
    del headers[lowest].ImagePositionPatient, headers[lowest].InstanceNumber
    del headers[highest].ImagePositionPatient
    twin = copy.deepcopy(headers[middle])
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = "ID_zztwin"  # after the middle one by id
    headers["ID_zztwin"] = twin
    mr, no_modality, upper = clean.index[clean["series_id"] == other_series][:3]
    headers[mr] = pydicom.dcmread(frame.loc[mr, "path"])
    headers[mr].Modality = "MR"
    headers[no_modality] = pydicom.dcmread(frame.loc[no_modality, "path"])
    del headers[no_modality].Modality
    for image_id, ds in headers.items():
        ds.save_as(folder / f"{image_id}.dcm")
    ds = pydicom.dcmread(frame.loc[upper, "path"])
    del ds.SOPInstanceUID
    ds.save_as(folder / "ID_upper.DCM")
    found = rdata.scan(str(folder), training=False, max_error_fraction=0.5)
    return {"folder": folder, "scan": found, "order": order, "lowest": lowest, "highest": highest, "middle": middle,
            "mr": mr, "no_modality": no_modality}


def test_files_that_are_not_ct_are_error_rows_and_a_missing_modality_is_accepted(odd):
    found = odd["scan"]
    assert list(found.errors["image_id"]) == [odd["mr"]]
    assert found.errors["reason"].iloc[0] == f"{odd['folder'] / odd['mr']}.dcm ({odd['mr']}): not a CT image (Modality MR)"
    assert odd["no_modality"] in found.index.index and odd["mr"] not in found.index.index


def test_an_upper_case_extension_is_not_part_of_the_image_id(odd):
    found = odd["scan"]
    assert found.index.loc["ID_upper", "path"] == str(odd["folder"] / "ID_upper.DCM")


def test_scanned_slices_without_a_place_among_their_series_stand_alone(odd):
    found = odd["scan"]
    lowest, highest, middle = odd["lowest"], odd["highest"], odd["middle"]
    got = {i: [Path(p).stem for p in stack] for i, stack in zip(found.index["image_id"],
                                                                 rdata.neighbor_paths(found.index, found.index, 1))}
    # Independent truth: the InstanceNumber each file was written with; the lowest and highest slices lost their
    # place (no position; an InstanceNumber among positions in mm), so the rest is one run with no gap.
    placed = [i for i in odd["order"] if i not in (lowest, highest)]
    want = {i: [placed[max(k - 1, 0)], i, placed[min(k + 1, len(placed) - 1)]] for k, i in enumerate(placed)}
    want |= {lowest: [lowest] * 3, highest: [highest] * 3, "ID_zztwin": [*want[middle][:1], "ID_zztwin", *want[middle][2:]]}
    assert {i: got[i] for i in want} == want


def test_prepare_replaces_a_previous_cache_and_refuses_any_other_folder(odd, tmp_path):
    cache = tmp_path / "cache"
    cfg = DataConfig(data=str(odd["folder"]), image_size=SIZE, max_error_fraction=0.5)
    assert rdata.prepare(cfg, str(cache))["errors"] == 1
    assert "not a CT image (Modality MR)" in (cache / "errors.csv").read_text()
    old = {p.name for p in cache.glob("shard-*.parquet")}
    assert old
    # Prepared again with other windows, failing its error gate: no cache is left (no marker describing the old
    # windows over new shards, no old shard).
    with pytest.raises(rdata.DataError, match="over max_error_fraction"):
        rdata.prepare(replace(cfg, windows="brain", max_error_fraction=0.0), str(cache))
    assert not rdata.is_cache(str(cache)) and old.isdisjoint(p.name for p in cache.glob("shard-*.parquet"))
    stats = rdata.prepare(replace(cfg, windows="brain"), str(cache))
    index = pd.read_parquet(cache / rdata.CACHE_INDEX)
    assert {p.name for p in cache.glob("shard-*.parquet")} == set(index["shard"]) and len(index) == stats["images"]
    assert json.loads((cache / rdata.CACHE_MARKER).read_text())["windows"] == [[40, 80]]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(rdata.DataError, match=re.escape(f"{other}: not empty and not a raysys cache (it holds notes.txt")):
        rdata.prepare(cfg, str(other))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
