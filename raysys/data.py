"""Ray Data: list DICOMs, read + decode + window in read tasks, split by patient, balance, augment, cache.

How the pieces fit (all on Ray Data, so CPU nodes decode while GPU workers train):

1. `scan(data, labels)` reads every file once, validates it with the DICOM core and
   keeps its header fields (no pixels) in a small pandas index. Bad files become
   error records (image id, path, reason), written to `errors.csv`; more than
   `max_error_fraction` of them fails the run. A prepared cache is scanned by
   reading its index (no Ray job at all).
2. `split_by_patient(index, ...)` holds patients (PatientID, else StudyInstanceUID)
   out whole, stratified on `any`; `balance(train, epoch, ...)` draws the epoch's
   negatives with (seed, epoch).
3. `image_dataset(index, source, ...)` streams just those images: read tasks that read,
   decode and window their own files into (C, S, S) uint8, or the rows of the cache shards
   that hold them; `augment_dataset(ds, ...)` adds train-side augmentation on the data workers.

The cache (`prepare`) is decoding done once: zstd-compressed Parquet shards of SHARD_ROWS
images in a seeded random order (every shard a mix of patients), the image as one fixed-size
binary column (C x S x S bytes) that reads back as one contiguous (B, C, S, S) array, and
`index.parquet` saying which shard and row hold each image. An epoch reads only the shards
it needs, one task per shard, with plain pyarrow: no Parquet footer actors, no id filter
over the whole cache.

Resources on small machines: decode tasks reserve `decode_cpus` (0.25) CPUs each
and Train workers 0.5 each (`TrainConfig.cpus_per_worker`), so on a 2-core machine
two workers hold 1 CPU and up to four decode tasks share the other. With whole
CPUs per worker, Ray Data could never schedule a task and the run would hang.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from raysys import storage
from raysys.augment import augment_images, image_seed
from raysys.config import AugmentConfig, DataConfig, InputError
from raysys.dicom import DicomDecodeError, decode, require_ct
from raysys.labels import ANY, LABELS, read_labels
from raysys.windowing import Window, parse_windows, window_pixels

log = logging.getLogger(__name__)

_DATA = DataConfig()  # the defaults of every keyword below come from the one configuration
PROGRESS_EVERY_S = 10.0  # one progress line per interval for long scans, never a redrawn bar

META_COLUMNS = ["image_id", "path", "patient_id", "study_id", "series_id", "z", "position"]
ERROR_COLUMNS = ["image_id", "path", "reason"]
CACHE_MARKER = "raysys-cache.json"  # written last by prepare(); its presence marks a complete cache
CACHE_INDEX = "index.parquet"  # one row per cached image: META_COLUMNS + shard + row
# Every file prepare() writes (shards: SHARD_NAME); a folder holding anything else is not replaced by a cache.
CACHE_FILES = (CACHE_MARKER, CACHE_INDEX, "errors.csv", "labels.csv")
SHARD_NAME = re.compile(r"shard-[0-9a-f]{32}\.parquet")
SHARD_ROWS = 256  # images per cache shard: ~8 MB at 256 px after zstd, one read task each
# 42 KB per real RSNA slice at 256 px, ~7,500 img/s read per core from the page cache (lz4: 52 KB, 12,000-15,000;
# none: 197 KB): the fewest bytes from NFS or S3, and decompressing is a small part of a cache epoch's time.
CACHE_COMPRESSION = "zstd"
FILES_PER_TASK = 32  # DICOMs per read+decode task: ~16 MiB read, ~15 ms of decoding


class DataError(InputError, RuntimeError):
    """The data as a whole cannot be used (too many bad files, missing labels, ...)."""


@dataclass(frozen=True)
class Scan:
    """What scan() found: usable images (index) and the files that could not be read (errors)."""

    index: pd.DataFrame  # META_COLUMNS (+ LABELS when labels were given), one row per good image
    errors: pd.DataFrame  # ERROR_COLUMNS, one row per unreadable file
    source: str  # "dicom" or "cache"
    data: str  # the folder/URI that was scanned

    @property
    def total(self) -> int:
        return len(self.index) + len(self.errors)


# --- reading and decoding ---------------------------------------------------------------


def is_cache(data: str) -> bool:
    """True when `data` (a local folder or a URI) was written by prepare()."""
    return storage.is_file(storage.join(data, CACHE_MARKER))


def _image_id_from_path(path: str) -> str:
    """The file's name without its .dcm extension in any case (the lister admits ".DCM" too)."""
    name = Path(str(path)).name
    return name[:-len(".dcm")] if name.lower().endswith(".dcm") else name


def _decode_rows(paths: list[str], windows: tuple[Window, ...] | None, size: int, strict: bool) -> dict:
    """Read and decode DICOM files -> header fields (+ windowed image bytes when `windows` is given).

    A file that fails, whatever the exception (unreadable, vanished, not a DICOM, not CT), yields an error row
    naming it with an empty `image` (no pixels at all, never a stand-in image): one bad file never stops a
    scan. With strict=True it raises instead.
    """
    out = {name: [] for name in [*META_COLUMNS, "image", "error"]}
    for path in paths:
        try:
            dslice = decode(storage.read_bytes(path), name=str(path))
            require_ct(dslice.meta, str(path))  # an MR slice decodes, but Hounsfield windows mean nothing for it
            image = b""
            if windows is not None:
                image = window_pixels(dslice.pixels, dslice.slope, dslice.intercept, windows, size).tobytes()
            meta, error = dslice.meta, ""
        except Exception as e:
            if strict:
                raise
            named = isinstance(e, DicomDecodeError) or str(path) in str(e)  # storage's own errors name the file
            reason = str(e) if named else f"{path}: {type(e).__name__}: {e}"
            meta, image, error = None, b"", reason
        out["image_id"].append(meta.image_id if meta and meta.image_id else _image_id_from_path(path))
        out["path"].append(str(path))
        out["patient_id"].append(meta.patient_id if meta else "")
        out["study_id"].append(meta.study_id if meta else "")
        out["series_id"].append(meta.series_id if meta else "")
        out["z"].append(meta.z if meta else float("nan"))
        out["position"].append(meta.position if meta else float("nan"))
        out["image"].append(image)
        out["error"].append(error)
    return {name: np.array(values, dtype=np.float64 if name in ("z", "position") else object)
            for name, values in out.items()}


def _read_headers(paths: list[str], windows: tuple[Window, ...] | None, size: int, strict: bool) -> list[pa.Table]:
    return [pa.table(_decode_rows(paths, windows, size, strict))]


def _read_images(stacks: list[list[str]], ids: list[str], labels: np.ndarray | None,
                 windows: tuple[Window, ...], size: int) -> list[pa.Table]:
    """One read task of an image dataset: each row's files read, decoded and windowed into one (n, C, S, S)
    uint8 array (C = windows x files per row, lowest slice first), as Arrow tensors with ids (and labels).
    A file that fails raises, naming it: scan() admitted it, so it changed since."""
    channels = len(windows)
    images = np.empty((len(stacks), channels * len(stacks[0]), size, size), np.uint8)
    windowed: dict[str, np.ndarray] = {}  # 2.5D: a slice is also its neighbours' neighbour, read once per task
    for row, stack in enumerate(stacks):
        for k, path in enumerate(stack):
            if path not in windowed:
                dslice = decode(storage.read_bytes(path), name=path)
                windowed[path] = window_pixels(dslice.pixels, dslice.slope, dslice.intercept, windows, size)
            images[row, k * channels:(k + 1) * channels] = windowed[path]
    out = {"image": pa.FixedShapeTensorArray.from_numpy_ndarray(images), "image_id": pa.array(ids, pa.string())}
    if labels is not None:
        out["label"] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(labels, np.float32))
    return [pa.table(out)]


class _DicomFiles(Datasource):
    """Read tasks of FILES_PER_TASK DICOM files each that read the files themselves.

    rows: per row the paths of its files (one; 2n + 1 for 2.5D). With `ids`, a task yields images
    (`_read_images`); without, the files' header rows and error rows (`_decode_rows`, for scan and prepare).
    Ray's read_binary_files would hand the bytes to the decoding step as an Arrow column, then numpy, each a
    copy of ~16 MB per task: a warm augmented epoch of 1,950 phantom slices ran at 515-560 img/s that way and
    720-790 img/s with this reader (2 cores).
    """

    def __init__(self, rows: list[list[str]], *, windows: tuple[Window, ...] | None, size: int, strict: bool = True,
                 ids: list[str] | None = None, labels: np.ndarray | None = None):
        self.rows, self.windows, self.size, self.strict = rows, windows, size, strict
        self.ids, self.labels = ids, labels
        self.step = max(1, FILES_PER_TASK // len(rows[0])) if rows else 1  # rows per task: as many files as for slices

    @property
    def num_tasks(self) -> int:
        return max(1, -(-len(self.rows) // self.step))

    def get_name(self) -> str:
        return "DICOM"  # its tasks show as ReadDICOM

    def estimate_inmemory_data_size(self) -> int:
        channels = len(self.windows or ()) * len(self.rows[0]) if self.rows else 0
        return len(self.rows) * channels * self.size * self.size

    def _read_fn(self, start: int, stop: int):
        """The task's function, holding its own rows only (it is pickled once per task)."""
        rows = self.rows[start:stop]
        if self.ids is None:
            return functools.partial(_read_headers, [stack[0] for stack in rows], self.windows, self.size, self.strict)
        labels = None if self.labels is None else self.labels[start:stop]
        return functools.partial(_read_images, rows, self.ids[start:stop], labels, self.windows, self.size)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        tasks = []
        for start in range(0, len(self.rows), self.step):
            rows = self.rows[start:start + self.step]
            files = [path for stack in rows for path in stack]
            meta = BlockMetadata(num_rows=len(rows), size_bytes=None, exec_stats=None, input_files=files)
            tasks.append(ReadTask(self._read_fn(start, start + self.step), meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _read_dicoms(source: _DicomFiles, cpus: float) -> ray.data.Dataset:
    return ray.data.read_datasource(source, num_cpus=cpus, override_num_blocks=source.num_tasks)


def _decoded(paths: list[str], windows, size, decode_cpus, strict) -> ray.data.Dataset:
    """Header rows (+ image bytes with `windows`) and error rows of `paths`, FILES_PER_TASK files per task."""
    return _read_dicoms(_DicomFiles([[str(p)] for p in paths], windows=windows, size=size, strict=strict), decode_cpus)


# --- scan: the index of usable images and the error records -------------------------------


def _collect(ds: ray.data.Dataset, what: str) -> pd.DataFrame:
    """Run a small-rowed dataset to a frame, logging one progress line per PROGRESS_EVERY_S and one at the end."""
    parts, rows, start = [], 0, time.perf_counter()
    shown = start
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        parts.append(batch)
        rows += len(batch)
        if time.perf_counter() - shown > PROGRESS_EVERY_S:
            shown = time.perf_counter()
            log.info("%s: %d files so far, %.0f files/s", what, rows, rows / (shown - start))
    seconds = time.perf_counter() - start
    log.info("%s: %d files in %.1fs (%.0f files/s)", what, rows, seconds, rows / seconds if seconds else 0.0)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*META_COLUMNS, "error"])


def scan_cpus(decode_cpus: float) -> float:
    """CPUs per scan task: one where the cluster has one free (a scan runs before training, not beside it), else
    `decode_cpus`. Headers parse in a few ms per file, so on a fresh small node the cost is in the worker processes
    that fractional tasks start: the first scan of 1,450 files on 2 cores took 5.2 s in 1-CPU tasks against 12.4 s
    in quarter-CPU ones (12.9-13.3 s when Ray listed the folder and made its own ~7-file tasks; 1.2 s against 2.1 s
    once worker processes are running)."""
    return max(decode_cpus, 1.0) if ray.available_resources().get("CPU", 0.0) >= 1.0 else decode_cpus


def scan(
    data: str,
    labels: str | None = None,
    *,
    training: bool = True,
    max_error_fraction: float = _DATA.max_error_fraction,
    run_dir: str | None = None,
    decode_cpus: float = _DATA.decode_cpus,
) -> Scan:
    """Index every image under `data` (DICOM folder/URI or prepared cache) and record bad files.

    With `labels`, the index gains the six label columns; for training data
    (`training=True`) an image without a label row is an error naming it.
    Errors go to `run_dir/errors.csv` and one summary log line.
    """
    data = storage.resolve(data)
    if is_cache(data):
        frame, source = _read_cache_index(data), "cache"
        log.info("scan %s (cache): %d images, %d unreadable files", data, int((frame["error"] == "").sum()),
                 int((frame["error"] != "").sum()))
    else:
        if not storage.exists(data):
            raise FileNotFoundError(f"{data}: no such file or folder")
        paths = [data] if storage.is_file(data) else list(storage.list_files(data, ".dcm"))
        if not paths:
            raise DataError(f"{data}: no .dcm files found")
        cpus = scan_cpus(decode_cpus)
        ds = _decoded(paths, None, 0, cpus, strict=False).select_columns([*META_COLUMNS, "error"], num_cpus=cpus)
        frame, source = _collect(ds, f"scan {data}"), "dicom"
    if frame.empty:
        raise DataError(f"{data}: no .dcm files found")
    text = [c for c in frame.columns if c not in ("z", "position", "row")]
    frame[text] = frame[text].astype(str)
    scheme, sep, _ = data.partition("://")
    if sep and source == "dicom":  # Ray lists s3://bucket/key as bucket/key; keep paths re-readable
        frame["path"] = frame["path"].where(frame["path"].str.contains("://"), scheme + "://" + frame["path"])
    bad = frame["error"] != ""
    errors = frame.loc[bad, ["image_id", "path", "error"]].rename(columns={"error": "reason"}).reset_index(drop=True)
    where = ["shard", "row"] if source == "cache" else []  # where the cache holds each image
    index = frame.loc[~bad, META_COLUMNS + where].sort_values(["patient_id", "study_id", "z", "image_id"])
    duplicated = index["image_id"].duplicated()
    if duplicated.any():
        raise DataError(f"{data}: image id {index.loc[duplicated, 'image_id'].iloc[0]} appears in more than one file")
    index = index.set_index("image_id", drop=False)
    index.index.name = None
    if labels:
        index = _attach_labels(index, read_labels(labels), labels, training)
    result = Scan(index=index, errors=errors, source=source, data=data)
    report_errors(result, max_error_fraction, run_dir)
    return result


def _attach_labels(index: pd.DataFrame, table: pd.DataFrame, labels: str, training: bool) -> pd.DataFrame:
    missing = index.index.difference(table.index)
    if len(missing) and training:
        raise DataError(
            f"{labels}: {len(missing)} images have no label rows, e.g. {list(missing[:5])}; "
            "training needs a label for every image"
        )
    joined = index.join(table, how="left")
    joined[list(LABELS)] = joined[list(LABELS)].fillna(-1).astype(np.int8)  # -1: unlabelled (inference only)
    return joined


def report_errors(result: Scan, max_error_fraction: float, run_dir: str | None) -> None:
    """errors.csv in the run directory, one summary log line, and the max_error_fraction gate."""
    n_bad, total = len(result.errors), result.total
    where = ""
    if run_dir is not None:
        path = storage.join(run_dir, "errors.csv")
        storage.write_text(path, result.errors.to_csv(index=False))
        where = f" (listed in {path})"
    if n_bad:
        reasons = result.errors["reason"].astype(str).map(lambda r: r.split(": ", 1)[-1].split(" (")[0])
        common = reasons.value_counts().head(3).to_dict()
        log.warning("%d of %d files unreadable%s; most common reasons: %s", n_bad, total, where, common)
    if total and n_bad / total > max_error_fraction:
        raise DataError(
            f"{n_bad} of {total} files ({n_bad / total:.2%}) are unreadable, over max_error_fraction "
            f"{max_error_fraction:.2%}{where}; first: {result.errors['reason'].iloc[0]}"
        )


# --- split and balance --------------------------------------------------------------------


def group_ids(index: pd.DataFrame) -> pd.Series:
    """The unit kept whole by splits: PatientID (a slice without one takes its study's: a partly anonymised
    study stays with its patient), falling back to StudyInstanceUID, then the image."""
    patient, study = index["patient_id"].where(index["patient_id"] != ""), index["study_id"]
    study_patient = patient[study != ""].groupby(study[study != ""]).first()  # each study's first PatientID
    group = patient.fillna(study.map(study_patient)).fillna(study)
    return group.where(group != "", index["image_id"])


def _group_has_bleed(index: pd.DataFrame, groups: pd.Series) -> pd.Series:
    """Per group (patient): whether any of its images has a bleed (all False without labels)."""
    return index["any"].groupby(groups).max() > 0 if "any" in index else pd.Series(False, index=groups.unique())


def fold_of_groups(index: pd.DataFrame, folds: int, seed: int) -> pd.Series:
    """Assign each group (patient) to one of `folds` folds, stratified on whether it has any bleed.

    Patients with a bleed are dealt round-robin from fold 0, so fold 0 holds one whenever two or
    more patients have one, and every fold does when at least `folds` of them do; the other
    patients start at a seeded random fold.
    """
    groups = group_ids(index)
    positive = _group_has_bleed(index, groups)
    rng = np.random.default_rng(seed)
    assignment = {}
    for flag in (True, False):
        members = np.array(sorted(positive.index[positive == flag]))
        rng.shuffle(members)
        # A single patient with a bleed goes to fold 1: training keeps it (validation could not use it alone).
        offset = (1 if len(members) == 1 else 0) if flag else int(rng.integers(folds))
        assignment.update({g: (i + offset) % folds for i, g in enumerate(members)})
    return groups.map(assignment)


def split_by_patient(
    index: pd.DataFrame, *, val_fraction: float = 0.1, seed: int = 0, folds: int = 0, fold: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation): whole patients on one side, stratified on `any`, deterministic for the seed.

    folds == 0: validation takes round(val_fraction x patients) patients (at least one, and never all: with a single
    patient it is empty); folds = k: fold `fold` of k. A pure function of (index, val_fraction, seed, folds, fold):
    the sequence stage and Tune re-create a run's split from them.
    """
    if folds:
        held = fold_of_groups(index, folds, seed) == fold
    else:
        groups = group_ids(index)
        held = groups.map(_held_out(index, groups, val_fraction, seed)).astype(bool)
    return index[~held], index[held]


def _held_out(index: pd.DataFrame, groups: pd.Series, val_fraction: float, seed: int) -> pd.Series:
    """Per group: True for the round(val_fraction x groups) groups of the validation side, stratified on `any`.

    Of the patients with a bleed, validation takes the same share (at least one when two or more have one, never
    all: a single one trains, as with folds); the rest of its patients are drawn from those without.
    """
    positive = _group_has_bleed(index, groups)
    n, n_pos = len(positive), int(positive.sum())
    n_val = max(0, min(max(1, round(val_fraction * n)), n - 1))
    pos_val = min(max(1, round(val_fraction * n_pos)), n_pos - 1) if n_pos >= 2 else 0
    pos_val = min(n_val, max(pos_val, n_val - (n - n_pos)))  # too few patients without a bleed: more with one
    rng = np.random.default_rng(seed)
    held = pd.Series(False, index=positive.index)
    for flag, take in ((True, pos_val), (False, n_val - pos_val)):
        members = np.array(sorted(positive.index[positive == flag]))
        rng.shuffle(members)
        held.loc[list(members[:take])] = True
    return held


def degenerate_validation(val: pd.DataFrame) -> bool:
    """True when the validation side has no image with a bleed: its score then only measures negatives."""
    return len(val) == 0 or int((val[LABELS[ANY]] == 1).sum()) == 0


def order_series(index: pd.DataFrame) -> pd.DataFrame:
    """`index` ordered series by series, each by position (ties by image id), with each image's place in it.

    Adds `series` (the series' key: its SeriesInstanceUID; an image without one is a series of its own,
    "image:<image id>"), `slice` (0 = lowest position), `series_slices`, `isolated` (the slice has no place among
    the others: no position at all, or one of another kind than its series'; it comes after them and has no
    neighbours), `duplicate_position` (another slice of the series lies at the same place) and `gap_before` (the
    step from the previous place is over 1.5 x the series' median step: slices are missing there, e.g. files that
    failed to decode). A series' slices may come from any folders.

    Positions are of two kinds (raysys.dicom.slice_position): mm from ImagePositionPatient (`z` is known) or
    InstanceNumber, a count. A series orders the slices of the kind most of them have (mm on a tie); with no `z`
    column every position counts as mm.
    """
    series = index["series_id"].where(index["series_id"] != "", "image:" + index["image_id"])
    position = pd.to_numeric(index["position"], errors="coerce").astype(np.float64)
    has_z = pd.to_numeric(index["z"], errors="coerce").notna() if "z" in index else pd.Series(True, index=index.index)
    kind = np.where(position.isna(), "", np.where(has_z, "mm", "instance"))
    counts = pd.DataFrame({"mm": kind == "mm", "instance": kind == "instance"}).groupby(series.to_numpy()).transform("sum")
    isolated = kind != np.where(counts["mm"] >= counts["instance"], "mm", "instance")
    frame = index.assign(series=series, position=position, isolated=isolated).sort_values(
        ["series", "isolated", "position", "image_id"], na_position="last")
    groups = frame.groupby("series", sort=False)
    frame["slice"] = groups.cumcount()
    frame["series_slices"] = groups["image_id"].transform("size")
    placed = ~frame["isolated"].to_numpy()
    ranked = frame.loc[placed, ["series", "position"]]  # the slices with a place in their series, in order
    step = ranked.groupby("series", sort=False)["position"].diff().abs().to_numpy()
    median = pd.Series(np.where(step > 0, step, np.nan)).groupby(ranked["series"].to_numpy()).transform("median")
    gap, duplicate = np.zeros(len(frame), bool), np.zeros(len(frame), bool)
    gap[placed] = step > 1.5 * median.to_numpy()  # False where either is nan (first slice, one-slice series)
    duplicate[placed] = ranked.duplicated(["series", "position"], keep=False).to_numpy()
    frame["gap_before"], frame["duplicate_position"] = gap, duplicate
    return frame


def series_dataset(ds: ray.data.Dataset) -> ray.data.Dataset:
    """A Ray Data step: rows grouped by series and ordered within it (order_series on each series' rows)."""
    return ds.groupby("series_id").map_groups(order_series, batch_format="pandas")


def balance(train: pd.DataFrame, *, epoch: int, seed: int = 0, neg_ratio: float = 1.0) -> pd.DataFrame:
    """This epoch's training rows: every positive (`any` = 1) and neg_ratio x as many negatives.

    Drawn with (seed, epoch), so each epoch sees other negatives and a rerun sees the
    same ones; rows come back shuffled. Validation and test data are never balanced.
    """
    rng = np.random.default_rng([seed, epoch])
    positives = train[train["any"] == 1]
    negatives = train[train["any"] == 0]
    n_neg = min(len(negatives), round(neg_ratio * len(positives))) if len(positives) else len(negatives)
    chosen = negatives.iloc[rng.choice(len(negatives), size=n_neg, replace=False)] if n_neg else negatives.iloc[:0]
    rows = pd.concat([positives, chosen])
    return rows.iloc[rng.permutation(len(rows))]


def balance_logit_offset(train: pd.DataFrame, neg_ratio: float = 1.0) -> np.ndarray:
    """Per-label logit shift from balanced-epoch odds back to the training set's own odds, shape (6,).

    balance() keeps every positive (each subtype implies `any`) and n' - P of the
    N - P negatives, so a label with c positives has odds c / (n' - c) in an epoch
    and c / (N - c) overall: the model's logits are high by log((N - c) / (n' - c)).
    """
    n, n_pos = len(train), int((train["any"] == 1).sum())
    n_epoch = n_pos + (min(n - n_pos, round(neg_ratio * n_pos)) if n_pos else n - n_pos)
    counts = train[list(LABELS)].clip(lower=0).sum().to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.log((n_epoch - counts) / (n - counts))
    return np.where(np.isfinite(offset), offset, 0.0).astype(np.float32)


# --- image datasets ----------------------------------------------------------------------


def image_dataset(
    index: pd.DataFrame,
    source: Scan | str,
    *,
    windows: str | Iterable[Window] = _DATA.windows,
    size: int = _DATA.image_size,
    with_labels: bool = True,
    decode_cpus: float = _DATA.decode_cpus,
    neighbors: int = _DATA.neighbors,
) -> ray.data.Dataset:
    """Stream the images of `index` as rows `image` (uint8 (C, S, S)), `image_id` and `label` (float32 (6,)).

    From DICOMs: only the listed files are read and decoded. From a cache: only the shards holding
    them are read (the cache must have been prepared with the same windows and size). Rows come in
    the index's order, shard by shard (shards in the order their first image appears).

    neighbors > 0 (2.5D): each image is its series' slices -n..n, C = windows x (2n + 1), lowest first;
    a neighbour past the series' end or across a gap (slices missing there) is the slice itself. The
    series come from `source`'s whole index, so a balanced epoch's image still gets neighbours it leaves out.
    """
    windows = parse_windows(windows)
    data = source.data if isinstance(source, Scan) else source
    if is_cache(data):
        if neighbors:
            raise DataError(f"{data}: 2.5D input (neighbors {neighbors}) reads DICOMs; a prepared cache holds single "
                            "slices (give the DICOM folder)")
        _check_cache(data, windows, size)
        return _cached_images(index, data, (len(windows), size, size), with_labels, decode_cpus)
    if neighbors and not isinstance(source, Scan):
        raise ValueError("2.5D input needs the scan (its index knows every slice of each series)")
    rows = (neighbor_paths(index, source.index, neighbors) if neighbors
            else [[str(path)] for path in index["path"]])
    labels = index[list(LABELS)].to_numpy(np.float32) if with_labels else None
    return _read_dicoms(_DicomFiles(rows, windows=windows, size=size, ids=[str(i) for i in index["image_id"]],
                                    labels=labels), decode_cpus)


def neighbor_paths(index: pd.DataFrame, series_index: pd.DataFrame, neighbors: int) -> list[list[str]]:
    """Per row of `index`: the paths of its series' slices -neighbors..neighbors (order_series of `series_index`),
    the row's own path where that slice does not exist: past the series' end, across a gap, or for an isolated
    slice. A neighbour lies at another position: slices at one place stand for it once (the first by image id)
    and are never each other's neighbour."""
    ordered = order_series(series_index).reset_index(drop=True)
    at = {image_id: i for i, image_id in enumerate(ordered["image_id"])}
    placed = ordered[~ordered["isolated"]]
    first = ~placed.duplicated(["series", "position"]).to_numpy()  # the first slice at each place of a series
    place = np.full(len(ordered), -1)
    place[placed.index.to_numpy()] = np.cumsum(first) - 1
    places = placed[first]
    series, paths, gaps = places["series"].to_numpy(), places["path"].to_numpy(), places["gap_before"].to_numpy()
    out = []
    for image_id, own in zip(index["image_id"], index["path"]):
        i = place[at[image_id]]
        stack = []
        for step in range(-neighbors, neighbors + 1):
            j, ok = i, i >= 0 and step != 0
            while ok and j != i + step:  # walk place by place: a gap or the series' end stops the walk
                k = j + (1 if step > 0 else -1)
                ok = 0 <= k < len(places) and series[k] == series[i] and not gaps[max(j, k)]
                j = k
            stack.append(str(paths[j]) if ok else str(own))
        out.append(stack)
    return out


# --- augmentation --------------------------------------------------------------------------


def _image_seeds(ids, seed: int, epoch: int) -> np.ndarray:
    return np.array([image_seed(seed, epoch, str(i)) for i in ids], np.int64)


def _augment_batch(batch: dict, cfg: AugmentConfig, seed: int, epoch: int) -> dict:
    """Augment each image with a seed from (seed, epoch, image id): independent of how Ray groups rows into
    batches, so a (seed, epoch) rerun reproduces every image."""
    return {**batch, "image": augment_images(batch["image"], _image_seeds(batch["image_id"], seed, epoch), cfg)}


def _with_seeds(batch: dict, seed: int, epoch: int) -> dict:
    return {**batch, "aug_seed": _image_seeds(batch["image_id"], seed, epoch)}


def augment_dataset(ds: ray.data.Dataset, cfg: AugmentConfig, *, seed: int, epoch: int,
                    decode_cpus: float = _DATA.decode_cpus):
    """Train-side augmentation: albumentations on the data workers (cfg.on == "data"), or, for the training
    device to do it (cfg.on == "device", raysys.device_augment.DeviceAugment), each image's seed as `aug_seed`."""
    fn = _augment_batch if cfg.on == "data" else _with_seeds
    kwargs = {"seed": seed, "epoch": epoch, **({"cfg": cfg} if cfg.on == "data" else {})}
    return ds.map_batches(fn, fn_kwargs=kwargs, batch_format="numpy", num_cpus=decode_cpus)


# --- the preprocessed cache ----------------------------------------------------------------


def prepare(cfg: DataConfig, out: str) -> dict:
    """Decode and window every DICOM of `cfg.data` once into the cache at `out`; returns size statistics.

    Unreadable files are listed in `out/errors.csv` (scan() of the cache reports them again) and
    count against max_error_fraction as in training. The labels CSV (cfg.labels) is copied in.
    `out` may be new, empty or a previous cache, which is removed first (its marker before anything else, so a
    prepare that then fails leaves no cache at all); a folder holding other files is refused.
    """
    windows = parse_windows(cfg.windows)
    out = storage.resolve(out)
    if cfg.labels:
        read_labels(cfg.labels)  # fail early on a bad CSV, before hours of decoding
    labels = storage.read_bytes(cfg.labels) if cfg.labels else b""  # read before `out` is cleared: it may lie there
    sizes = storage.list_files(cfg.data, ".dcm")
    paths = list(sizes)
    if not paths:
        raise DataError(f"{cfg.data}: no .dcm files found")
    _clear_cache_folder(out)
    order = np.random.default_rng(cfg.seed).permutation(len(paths))  # every shard a mix of patients
    start = time.perf_counter()
    written = _collect(
        _decoded([paths[i] for i in order], windows, cfg.image_size, cfg.decode_cpus, strict=False).map_batches(
            _write_shard, fn_kwargs={"out": out}, batch_size=SHARD_ROWS, batch_format="numpy",
            num_cpus=cfg.decode_cpus),
        f"prepare {cfg.data} -> {out}")
    good = written["error"] == ""
    index = written.loc[good, [*META_COLUMNS, "shard", "row"]].reset_index(drop=True)
    storage.write_bytes(storage.join(out, CACHE_INDEX), _parquet_bytes(pa.Table.from_pandas(index)))
    errors = written.loc[~good, ["image_id", "path", "error"]].rename(columns={"error": "reason"})
    if cfg.labels:
        storage.write_bytes(storage.join(out, "labels.csv"), labels)
    report_errors(Scan(index, errors.reset_index(drop=True), "cache", out), cfg.max_error_fraction, out)
    dicom_bytes, cache_bytes = sum(sizes.values()), storage.tree_size(out)
    stats = {
        "images": int(good.sum()),
        "errors": int((~good).sum()),
        "windows": [(w.center, w.width) for w in windows],
        "size": cfg.image_size,
        "shards": int(index["shard"].nunique()),
        "seconds": round(time.perf_counter() - start, 1),
        "dicom_bytes": dicom_bytes,
        "cache_bytes": cache_bytes,
        "dicom_bytes_per_image": dicom_bytes / max(len(written), 1),
        "cache_bytes_per_image": cache_bytes / max(int(good.sum()), 1),
    }
    storage.write_text(storage.join(out, CACHE_MARKER), storage.to_json(stats))
    return stats


def _clear_cache_folder(out: str) -> None:
    """Make `out` ready for a new cache: remove a previous cache there (complete, or left by a failed prepare),
    marker first; refuse a file, or a folder holding any file prepare() does not write."""
    if storage.is_file(out):
        raise DataError(f"{out}: is a file; prepare writes a cache folder there")
    names = storage.folder_files(out)
    foreign = [name for name in names if not _is_cache_file(name)]
    if foreign:
        raise DataError(f"{out}: not empty and not a raysys cache (it holds {foreign[0]}, {len(foreign)} such files); "
                        "prepare into a new or empty folder, or into a previous cache to replace it")
    for name in sorted(names, key=lambda name: name != CACHE_MARKER):  # the marker first
        storage.remove_file(storage.join(out, name))


def _is_cache_file(name: str) -> bool:
    """A file prepare() writes, or the temporary file of one (storage.write_bytes, stopped midway)."""
    name = re.sub(r"\.tmp-\d+$", "", name)
    return name in CACHE_FILES or SHARD_NAME.fullmatch(name) is not None


def _parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue().to_pybytes()


def _write_shard(batch: dict, out: str) -> dict:
    """One cache shard from a batch of decoded rows; returns the rows' index entries (shard, row) or errors."""
    good = np.flatnonzero(batch["error"] == "")
    name = f"shard-{uuid.uuid4().hex}.parquet"
    rows = np.full(len(batch["image_id"]), -1, np.int64)
    if len(good):
        width = len(batch["image"][good[0]])
        images = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(width), len(good), [None, pa.py_buffer(b"".join(batch["image"][i] for i in good))])
        table = pa.table({"image_id": batch["image_id"][good].astype(str), "image": images})
        storage.write_bytes(storage.join(out, name), _parquet_bytes(
            table, compression=CACHE_COMPRESSION, row_group_size=SHARD_ROWS, use_dictionary=False))
        rows[good] = np.arange(len(good))
    meta = {k: v for k, v in batch.items() if k not in ("image", "bytes")}
    return {**meta, "shard": np.where(rows >= 0, name, ""), "row": rows}


def _read_cache_index(data: str) -> pd.DataFrame:
    """The cache's images (META_COLUMNS + shard + row) and its unreadable files, as one scan frame."""
    index = pd.read_parquet(storage.open_bytes(storage.join(data, CACHE_INDEX)))
    if "position" not in index.columns:  # a cache prepared before positions were indexed: z is what it had
        index["position"] = index["z"]
    errors = pd.read_csv(storage.open_bytes(storage.join(data, "errors.csv")), dtype=str, keep_default_na=False)
    errors = errors.rename(columns={"reason": "error"}).assign(patient_id="", study_id="", series_id="", z=np.nan,
                                                               position=np.nan)
    return pd.concat([index.assign(error=""), errors], ignore_index=True)


def _cached_images(index: pd.DataFrame, data: str, shape: tuple[int, int, int], with_labels: bool,
                   read_cpus: float) -> ray.data.Dataset:
    """One read task per shard that holds images of `index`, with those images' rows (and labels)."""
    shards = index["shard"].map(lambda s: storage.join(data, s))
    items = []
    for shard, rows in index.groupby(shards, sort=False):
        item = {"shard": shard, "rows": rows["row"].to_numpy(np.int64), "ids": rows["image_id"].to_numpy(str)}
        if with_labels:
            item["labels"] = rows[list(LABELS)].to_numpy(np.float32)
        items.append(item)
    return ray.data.read_datasource(_CacheShards(items, shape), num_cpus=read_cpus, override_num_blocks=max(1, len(items)))


class _CacheShards(Datasource):
    """The read tasks of a cache epoch, one per shard, with no operator in between (a from_items stage
    and a pandas batch per shard cost ~15% of a cache epoch on 2 cores)."""

    def __init__(self, items: list[dict], shape: tuple[int, int, int]):
        self.items, self.shape = items, shape

    def get_name(self) -> str:
        return "Cache"  # its tasks show as ReadCache

    def estimate_inmemory_data_size(self) -> int:
        return sum(len(item["rows"]) for item in self.items) * int(np.prod(self.shape))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_shard_rows, item, self.shape),
                         BlockMetadata(num_rows=len(item["rows"]), size_bytes=len(item["rows"]) * int(np.prod(self.shape)),
                                       exec_stats=None, input_files=[item["shard"]]),
                         per_task_row_limit=per_task_row_limit)
                for item in self.items]


def _read_shard_rows(entry: dict, shape: tuple[int, int, int]) -> list[pa.Table]:
    """The chosen rows of one shard as (n, C, S, S) uint8, taken from the image column's one buffer."""
    table = pq.read_table(storage.open_bytes(entry["shard"]), columns=["image_id", "image"])
    rows, stored = entry["rows"], table.column("image_id").to_numpy(zero_copy_only=False)
    if not (stored[rows] == entry["ids"]).all():
        raise DataError(f"{entry['shard']}: rows do not hold the images the cache index says; prepare it again")
    # Arrow's own fixed-shape tensor type wraps the rows without a copy (Ray's tensor type copies them into its
    # block at ~0.5 GB/s: 2,300 vs 1,800 img/s for a whole cache epoch on 2 cores).
    out = {"image": pa.FixedShapeTensorArray.from_numpy_ndarray(_take_images(table.column("image"), rows, shape)),
           "image_id": pa.array(entry["ids"], pa.string())}
    if "labels" in entry:
        labels = np.ascontiguousarray(np.asarray(entry["labels"], np.float32).reshape(len(rows), len(LABELS)))
        out["label"] = pa.FixedShapeTensorArray.from_numpy_ndarray(labels)
    return [pa.table(out)]


def _take_images(column: pa.ChunkedArray, rows: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Rows `rows` of a fixed-size binary column as (n, C, S, S) uint8, read from the column's chunks (one per row
    group) in place: no copy when the rows are a whole one-chunk shard in order, as a full epoch reads them."""
    width = column.type.byte_width
    views = [np.frombuffer(c.buffers()[1], np.uint8, count=len(c) * width, offset=c.offset * width).reshape(len(c), *shape)
             for c in column.chunks]
    if len(views) == 1:
        return views[0] if np.array_equal(rows, np.arange(len(views[0]))) else views[0][rows]
    starts = np.cumsum([0, *(len(v) for v in views)])  # a cache written with several row groups per shard
    chunk = np.searchsorted(starts, rows, side="right") - 1
    out = np.empty((len(rows), *shape), np.uint8)
    for k, view in enumerate(views):
        mine = np.flatnonzero(chunk == k)
        out[mine] = view[rows[mine] - starts[k]]
    return out


def _check_cache(data: str, windows: tuple[Window, ...], size: int) -> None:
    stats = json.loads(storage.read_text(storage.join(data, CACHE_MARKER)))
    have = [tuple(w) for w in stats["windows"]]
    want = [(w.center, w.width) for w in windows]
    if have != want or stats["size"] != size:
        raise DataError(
            f"{data}: cache holds windows {have} at {stats['size']} px, the run asks for {want} at {size} px; "
            "prepare a new cache or match the run to it"
        )
