"""Synthetic head-CT studies written as real DICOM files, with RSNA-format labels."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from raysys.labels import LABELS, write_labels
from raysys.windowing import resize_square

SUBTYPES: tuple[str, ...] = tuple(name for name in LABELS if name != "any")

# Per-slice prevalence in the RSNA 2019 training labels.
RSNA_PREVALENCE: dict[str, float] = {
    "epidural": 0.004,
    "intraparenchymal": 0.048,
    "intraventricular": 0.035,
    "subarachnoid": 0.047,
    "subdural": 0.063,
    "any": 0.143,
}
# Bleeds in 40% of slices: a few short studies then hold positives on both sides of a patient split
# (tests and smoke jobs).
DENSE_PREVALENCE: dict[str, float] = {
    "epidural": 0.05,
    "intraparenchymal": 0.15,
    "intraventricular": 0.1,
    "subarachnoid": 0.1,
    "subdural": 0.15,
    "any": 0.4,
}

# File defects injected by `quirks=True`, each into `quirk_files` images; the frame's `quirk` column names them.
QUIRKS: tuple[str, ...] = ("wrapped_intercept", "signed", "size", "truncated", "duplicate_rows")

AIR_HU = -1024.0  # what the scanner reports outside the head
PADDING_HU = -2000.0  # what many scanners put outside the reconstructed scan circle
FIELD_OF_VIEW_MM = 250.0  # RSNA: 512 pixels of 0.48828125 mm
SLICE_GAP_MM = 5.0  # RSNA's usual axial spacing
ODD_SHAPE_512 = (638, 490)  # rows, columns of the "size" quirk at size 512 (scaled with size)
VENTRICLE_HEIGHTS = (0.2, 0.85)  # share of the study's height (skull base 0, vertex 1) that shows lateral ventricles
ZONE_SLICES = (3, 10)  # slices spanned by one study's bleeding (before clipping to the ventricle slices)
WRAP_LOW_HU, WRAP_HIGH_HU = -1000, 3095  # what the RSNA 12-bit wrapped-intercept files can hold
MASKS_DIR = "masks"  # beside dicoms/ with PhantomConfig(masks=True): one <image_id>.npz per image
HEAD_MASK = "head"  # the mask of what lies inside the inner table (where a bleed can be), in every masks file

# Independent random streams, so that e.g. changing the prevalence leaves anatomy, noise and ids alone.
_LAYOUT, _IDS, _QUIRK_STREAM = 1, 2, 3
_ANATOMY, _NOISE, _BLEEDS = 0, 1, 2

_REPEAT_PATIENT = 0.1  # share of studies that belong to an earlier study's patient (RSNA has repeat scans)
# Header window styles as in RSNA: multi-valued with leading zeros, or single values.
_WINDOWS = (("00040\\00040", "00080\\00080"), ("00036\\00036", "00080\\00080"), ("30", "80"))


@dataclass(frozen=True)
class PhantomConfig:
    """What write_dataset generates. Validated here; the same config always gives the same bytes."""

    studies: int = 20  # ~360 slices: a demo dataset written in a few seconds
    slices_per_study: int | tuple[int, int] = (12, 24)  # inclusive range (or one count); series lengths vary in RSNA
    size: int = 512  # RSNA's matrix; tests use 128 to stay fast
    seed: int = 0  # everything (ids, anatomy, bleeds, noise, quirks) derives from it
    prevalence: Mapping[str, float] = field(default_factory=lambda: dict(RSNA_PREVALENCE))  # per slice, RSNA's figures
    quirks: bool = False  # clean files by default; quirks exist to exercise the readers' defect handling
    quirk_files: int = 2  # images per quirk kind: every branch is hit, too few to matter for training
    scan_circle_padding: float = 0.5  # share of studies with PADDING_HU outside the scan circle (True = all)
    masks: bool = False  # also write each slice's bleed and head masks (read_masks); not for training: costs time

    def __post_init__(self) -> None:
        if self.studies < 1:
            raise ValueError(f"studies must be >= 1, got {self.studies}")
        low, high = self.slice_range
        if not 2 <= low <= high:
            raise ValueError(f"slices_per_study must be >= 2 (low <= high), got {self.slices_per_study}")
        if self.size < 64:
            raise ValueError(f"size must be >= 64 pixels for the head to be drawable, got {self.size}")
        if self.quirk_files < 1:
            raise ValueError(f"quirk_files must be >= 1, got {self.quirk_files}")
        if not 0.0 <= float(self.scan_circle_padding) <= 1.0:
            raise ValueError(f"scan_circle_padding must be a share in [0, 1], got {self.scan_circle_padding}")
        if set(self.prevalence) != set(LABELS):
            raise ValueError(f"prevalence must give exactly {list(LABELS)}, got {sorted(self.prevalence)}")
        bad = {k: v for k, v in self.prevalence.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"prevalence values must lie in [0, 1], got {bad}")
        _bleed_rates(self)  # raises when no bleed plan reaches these figures

    @property
    def slice_range(self) -> tuple[int, int]:
        if isinstance(self.slices_per_study, int):
            return self.slices_per_study, self.slices_per_study
        low, high = self.slices_per_study
        return int(low), int(high)


# --- the plan: ids, anatomy parameters and bleed events, no pixels ---------------------------


@dataclass(frozen=True)
class _Bleed:
    """One hemorrhage over adjacent slices; shape parameters are in the head frame (mm, rad)."""

    subtype: str
    first: int  # slice indices, inclusive
    last: int
    hu: float  # density of its core
    angle: float  # EDH/SDH/SAH: where on the convexity; IPH: direction of its centre
    extent: float  # EDH/SDH/SAH: angular half-width (rad); IPH: centre distance / head radius; IVH: fill share
    size: float = 0.0  # EDH/SDH: greatest thickness (mm); IPH: radius (mm)
    side: int = 0  # IVH: -1 right, 1 left, 0 both ventricles

    def taper(self, k: int) -> float:
        """Size factor in (0, 1] on slice k: largest mid-run, smaller towards both ends."""
        run = self.last - self.first + 1
        return math.sin(math.pi * (k - self.first + 0.5) / run) ** 0.5


@dataclass(frozen=True)
class _Anatomy:
    """One head: outline, layers and densities (mm, HU)."""

    semi_axes: tuple[float, float]  # left-right, anterior-posterior, at the widest slice
    offset: tuple[float, float]  # head centre from the image centre
    rotation: float  # rad
    lobes: tuple[tuple[float, float], ...]  # (amplitude, phase) of outline harmonics 2, 3, 4
    scalp: float
    skull: float
    cortex: float  # cortical ribbon thickness
    scalp_hu: float
    white_hu: float
    gray_hu: float
    csf_hu: float
    falx_hu: float
    sinus_hu: float
    choroid_hu: float  # calcified choroid plexus; 0 = none
    pineal_hu: float  # calcified pineal gland; 0 = none
    sulci: int  # sulci around the convexity
    sulcus_phase: float
    noise: float  # HU std of the half-resolution noise before upsampling
    texture: np.ndarray = field(compare=False, repr=False)  # (8, 8) low-frequency tissue texture, HU

    @property
    def scale(self) -> float:
        """Head size relative to an average adult (sizes inner structures)."""
        return (self.semi_axes[0] + self.semi_axes[1]) / 170.0


@dataclass(frozen=True)
class _Study:
    index: int
    patient_id: str
    study_id: str
    series_id: str
    image_ids: tuple[str, ...]  # base to vertex
    z0: float  # mm of the first slice
    padded: bool  # PADDING_HU outside the scan circle
    window: tuple[str, str]  # header WindowCenter, WindowWidth
    tilt: float  # gantry tilt, rad (ImageOrientationPatient only)
    anatomy: _Anatomy
    bleeds: tuple[_Bleed, ...]


def _ventricle_slices(n: int) -> list[int]:
    low, high = VENTRICLE_HEIGHTS
    return [k for k in range(n) if low <= (k + 0.5) / n <= high]


def _run_lengths(zone: int) -> range:
    """Possible lengths of a secondary subtype's run inside a zone (>= 2 slices, >= half the zone)."""
    return range(max(2, math.ceil(zone / 2)), zone + 1)


def _bleed_rates(config: PhantomConfig) -> tuple[float, dict[str, float], dict[str, float]]:
    """(share of studies that bleed, primary-subtype weights, secondary-subtype chances) meeting the prevalence.

    A bleeding study has one zone of adjacent slices: its primary subtype covers all of
    it (so `any` is exactly the zone), every other subtype joins with its own chance on
    a sub-run. Expected slices per subtype then equal prevalence x expected slices.
    """
    prevalence = config.prevalence
    p_any = prevalence["any"]
    if p_any == 0:
        positive = {s: prevalence[s] for s in SUBTYPES if prevalence[s] > 0}
        if positive:
            raise ValueError(f"prevalence: 'any' is 0 but subtypes are not: {positive}")
        return 0.0, {}, {}
    low, high = config.slice_range
    zone_lengths = range(ZONE_SLICES[0], ZONE_SLICES[1] + 1)
    zones = [min(z, len(_ventricle_slices(n))) for n in range(low, high + 1) for z in zone_lengths]
    mean_zone = float(np.mean(zones))
    mean_run = float(np.mean([np.mean(_run_lengths(z)) for z in zones]))
    share = p_any * (low + high) / 2 / mean_zone
    if share > 1:
        raise ValueError(f"prevalence: 'any' {p_any} needs more bleeding slices than {config.slice_range} slices allow")
    ratio = {s: prevalence[s] / p_any for s in SUBTYPES}
    total = sum(ratio.values())
    if total < 1 - 1e-9:
        raise ValueError(f"prevalence: 'any' {p_any} exceeds the sum of the subtypes ({total * p_any:.4f})")
    primary = {s: r / total for s, r in ratio.items()}
    run_share = mean_run / mean_zone
    extra = {
        s: ratio[s] * (total - 1) / total / ((1 - primary[s]) * run_share) if primary[s] < 1 else 0.0
        for s in SUBTYPES
    }
    too_high = {s: round(v, 3) for s, v in extra.items() if v > 1}
    if too_high:
        raise ValueError(f"prevalence: subtypes {sorted(too_high)} too common next to 'any' {p_any} to plan")
    return share, primary, extra


def _new_hex(rng: np.random.Generator, digits: int, seen: set[str]) -> str:
    while True:
        text = "ID_" + format(int(rng.integers(0, 16**digits)), f"0{digits}x")
        if text not in seen:
            seen.add(text)
            return text


def _plan(config: PhantomConfig) -> list[_Study]:
    layout = np.random.default_rng([config.seed, _LAYOUT])
    ids = np.random.default_rng([config.seed, _IDS])
    seen: set[str] = set()
    rates = _bleed_rates(config)
    low, high = config.slice_range
    studies: list[_Study] = []
    for i in range(config.studies):
        n = int(layout.integers(low, high + 1))
        padded = bool(layout.random() < float(config.scan_circle_padding))
        window = _WINDOWS[int(layout.integers(len(_WINDOWS)))]
        z0 = round(float(layout.uniform(90.0, 180.0)), 3)
        tilt = math.radians(float(layout.uniform(0.0, 20.0)))
        repeat, earlier = layout.random() < _REPEAT_PATIENT, int(layout.integers(max(i, 1)))
        patient = _new_hex(ids, 8, seen)
        if repeat and i > 0:
            patient = studies[earlier].patient_id
        study_id, series_id = _new_hex(ids, 10, seen), _new_hex(ids, 10, seen)
        image_ids = tuple(_new_hex(ids, 9, seen) for _ in range(n))
        anatomy = _draw_anatomy(np.random.default_rng([config.seed, i, _ANATOMY]))
        bleeds = _draw_bleeds(np.random.default_rng([config.seed, i, _BLEEDS]), n, rates)
        studies.append(_Study(i, patient, study_id, series_id, image_ids, z0, padded, window, tilt, anatomy, bleeds))
    return studies


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    return _Anatomy(
        semi_axes=(u(68.0, 78.0), u(86.0, 98.0)),
        offset=(u(-6.0, 6.0), u(-6.0, 6.0)),
        rotation=u(-0.12, 0.12),
        lobes=tuple((u(0.0, 0.025), u(0.0, 2 * math.pi)) for _ in range(3)),
        scalp=u(4.0, 7.0),
        skull=u(5.5, 9.0),
        cortex=u(2.5, 4.0),
        scalp_hu=u(25.0, 45.0),
        white_hu=u(25.0, 30.0),
        gray_hu=u(35.0, 41.0),
        csf_hu=u(3.0, 12.0),
        falx_hu=u(45.0, 70.0),
        sinus_hu=u(55.0, 75.0),
        choroid_hu=u(70.0, 140.0) if rng.random() < 0.6 else 0.0,
        pineal_hu=u(90.0, 180.0) if rng.random() < 0.5 else 0.0,
        sulci=int(rng.integers(30, 44)),
        sulcus_phase=u(0.0, 2 * math.pi),
        noise=u(5.0, 8.0),
        texture=rng.standard_normal((8, 8)).astype(np.float32) * np.float32(2.5),
    )


def _draw_bleeds(
    rng: np.random.Generator, n: int, rates: tuple[float, dict[str, float], dict[str, float]]
) -> tuple[_Bleed, ...]:
    share, primary, extra = rates
    if rng.random() >= share:
        return ()
    ventricles = _ventricle_slices(n)  # bleeds stay within them so that IVH always has ventricles to fill
    zone = min(int(rng.integers(ZONE_SLICES[0], ZONE_SLICES[1] + 1)), len(ventricles))
    first = ventricles[0] + int(rng.integers(len(ventricles) - zone + 1))
    names = list(primary)
    main = names[int(rng.choice(len(names), p=[primary[s] for s in names]))]
    bleeds = [_draw_shape(rng, main, first, first + zone - 1)]
    for subtype in SUBTYPES:
        if subtype != main and rng.random() < extra[subtype]:
            lengths = _run_lengths(zone)
            run = int(rng.integers(lengths.start, lengths.stop))
            start = first + int(rng.integers(zone - run + 1))
            bleeds.append(_draw_shape(rng, subtype, start, start + run - 1))
    return tuple(bleeds)


def _lateral_angle(rng: np.random.Generator, spread: float) -> float:
    """An angle near the left or right convexity (0 or pi in the head frame), where these bleeds mostly sit."""
    return float(rng.choice([0.0, math.pi]) + rng.uniform(-spread, spread))


def _draw_shape(rng: np.random.Generator, subtype: str, first: int, last: int) -> _Bleed:
    u = rng.uniform
    if subtype == "epidural":  # biconvex lens against the inner table, mostly temporal
        return _Bleed(subtype, first, last, u(60, 85), _lateral_angle(rng, 0.7), u(0.22, 0.4), size=u(7, 16))
    if subtype == "subdural":  # long thin crescent along the convexity
        return _Bleed(subtype, first, last, u(52, 80), _lateral_angle(rng, 1.0), u(0.5, 1.2), size=u(4, 10))
    if subtype == "subarachnoid":  # blood in the sulci of one sector
        return _Bleed(subtype, first, last, u(55, 88), u(-math.pi, math.pi), u(0.35, 1.0))
    if subtype == "intraparenchymal":  # irregular blob in the brain, with an oedema halo
        return _Bleed(subtype, first, last, u(55, 85), u(-math.pi, math.pi), u(0.15, 0.45), size=u(6, 20))
    if subtype == "intraventricular":  # layering in the dependent (posterior) part of the ventricles
        return _Bleed(subtype, first, last, u(55, 85), 0.0, u(0.3, 0.7), side=int(rng.integers(-1, 2)))
    raise ValueError(f"unknown subtype {subtype!r}; expected one of {SUBTYPES}")


def _assign_quirks(config: PhantomConfig, image_ids: list[str]) -> dict[str, str]:
    """image id -> quirk name, for `quirk_files` distinct images per quirk."""
    if not config.quirks:
        return {}
    wanted = len(QUIRKS) * config.quirk_files
    if wanted > len(image_ids):
        raise ValueError(
            f"quirks need {wanted} images ({config.quirk_files} per kind), the dataset has {len(image_ids)}"
        )
    rng = np.random.default_rng([config.seed, _QUIRK_STREAM])
    picks = rng.choice(len(image_ids), size=wanted, replace=False)
    return {image_ids[int(i)]: QUIRKS[j // config.quirk_files] for j, i in enumerate(picks)}


def _frame(studies: list[_Study], quirks: dict[str, str]) -> pd.DataFrame:
    rows = []
    for study in studies:
        for k, image_id in enumerate(study.image_ids):
            row = {name: 0 for name in LABELS}
            for bleed in study.bleeds:
                if bleed.first <= k <= bleed.last:
                    row[bleed.subtype] = row["any"] = 1
            row.update(
                image_id=image_id,
                patient_id=study.patient_id,
                study_id=study.study_id,
                series_id=study.series_id,
                z=study.z0 + SLICE_GAP_MM * k,
                quirk=quirks.get(image_id, ""),
            )
            rows.append(row)
    frame = pd.DataFrame(rows).set_index("image_id")
    frame[list(LABELS)] = frame[list(LABELS)].astype(np.int8)
    return frame[[*LABELS, "patient_id", "study_id", "series_id", "z", "quirk"]]


def plan_dataset(config: PhantomConfig) -> pd.DataFrame:
    """What write_dataset writes, without writing: the same frame less its `path` column. Fast (no pixels)."""
    studies = _plan(config)
    return _frame(studies, _assign_quirks(config, [i for s in studies for i in s.image_ids]))


# --- rendering: a study's geometry on a pixel grid, then one slice at a time -------------------


@dataclass
class _Canvas:
    """A study rasterised on one pixel grid. Per-slice work happens only inside `box` (the head's bounds)."""

    spacing: float  # mm per pixel
    background: np.ndarray  # (rows, cols) float32: air, or padding outside the scan circle
    box: tuple[slice, slice]
    x: np.ndarray  # head frame, mm: left-right (box-shaped float32, like every field below)
    y: np.ndarray  # anterior (-) to posterior (+)
    r: np.ndarray  # distance from the head centre, mm
    reach: np.ndarray  # distance from the centre to the outline at this angle, at the widest slice, mm
    sulcus_line: np.ndarray  # 0..1, thin radial CSF lines
    sulcus_wide: np.ndarray  # 0..1, the gyral pattern that thickens the cortex
    sulcus_depth: np.ndarray  # mm below the brain surface that sulci reach
    texture: np.ndarray  # HU, low-frequency gray/white texture
    deep_gray: np.ndarray  # 0..1, basal ganglia
    falx: np.ndarray  # 0..1
    sinus_x: np.ndarray  # |x| behind the centre, +inf in front: the superior sagittal sinus hugs it
    choroid: np.ndarray  # 0..1
    pineal: np.ndarray  # 0..1
    bleed_fields: tuple[np.ndarray | None, ...]  # one per study bleed (see _bleed_field)


def _head_scale(h: float) -> float:
    """Outline scale at relative height h (0 skull base, 1 vertex): an ellipsoid widest at 0.4."""
    return math.sqrt(max(0.0, 1.0 - ((h - 0.4) / 0.655) ** 2))


def _inside(margin_mm: np.ndarray, spacing: float) -> np.ndarray:
    """Partial-volume coverage of pixels whose centre lies `margin_mm` inside an edge (negative: outside)."""
    return np.clip(margin_mm / np.float32(spacing) + np.float32(0.5), 0.0, 1.0)


def _head_box(a: _Anatomy, rows: int, cols: int, spacing: float) -> tuple[slice, slice]:
    grow = 1 + sum(amp for amp, _ in a.lobes)
    ax, ay = a.semi_axes[0] * grow, a.semi_axes[1] * grow
    c, s = math.cos(a.rotation), math.sin(a.rotation)
    half_x = math.hypot(ax * c, ay * s) + 2 * spacing
    half_y = math.hypot(ax * s, ay * c) + 2 * spacing

    def span(centre_mm: float, half_mm: float, n: int) -> slice:
        lo = math.floor((centre_mm - half_mm) / spacing + (n - 1) / 2)
        hi = math.ceil((centre_mm + half_mm) / spacing + (n - 1) / 2) + 1
        return slice(max(lo, 0), min(hi, n))

    return span(a.offset[1], half_y, rows), span(a.offset[0], half_x, cols)


def _angle_off(theta: np.ndarray, angle: float) -> np.ndarray:
    """Signed angular distance theta - angle, wrapped to [-pi, pi)."""
    return np.mod(theta - np.float32(angle) + np.float32(math.pi), np.float32(2 * math.pi)) - np.float32(math.pi)


def _ellipse(
    x: np.ndarray, y: np.ndarray, centre: tuple[float, float], radii: tuple[float, float], spacing: float
) -> np.ndarray:
    """Coverage 0..1 of an axis-aligned ellipse (head frame, mm)."""
    d = np.hypot((x - np.float32(centre[0])) / np.float32(radii[0]), (y - np.float32(centre[1])) / np.float32(radii[1]))
    return _inside((1 - d) * np.float32(min(radii)), spacing)


def _rasterise(study: _Study, rows: int, cols: int, spacing: float) -> _Canvas:
    """Everything about a study that does not change from slice to slice, on a rows x cols grid."""
    a = study.anatomy
    f32 = np.float32
    ys = (np.arange(rows, dtype=f32) - f32((rows - 1) / 2)) * f32(spacing)
    xs = (np.arange(cols, dtype=f32) - f32((cols - 1) / 2)) * f32(spacing)
    background = np.full((rows, cols), AIR_HU, dtype=f32)
    if study.padded:
        radius = min(rows, cols) / 2 * spacing
        background[ys[:, None] ** 2 + xs[None, :] ** 2 > radius**2] = PADDING_HU

    box = _head_box(a, rows, cols, spacing)
    dx = xs[box[1]][None, :] - f32(a.offset[0])
    dy = ys[box[0]][:, None] - f32(a.offset[1])
    c, s = f32(math.cos(a.rotation)), f32(math.sin(a.rotation))
    x, y = c * dx + s * dy, -s * dx + c * dy
    r = np.hypot(x, y)
    theta = np.arctan2(y, x)
    outline = np.ones_like(r)
    for harmonic, (amp, phase) in enumerate(a.lobes, start=2):
        outline += f32(amp) * np.cos(f32(harmonic) * theta + f32(phase))
    reach = outline / np.sqrt((np.cos(theta) / f32(a.semi_axes[0])) ** 2 + (np.sin(theta) / f32(a.semi_axes[1])) ** 2)

    # Sulci: wavy radial lines, phase-shifted with depth so they do not look like spokes.
    phase = f32(a.sulci) * theta + f32(1.3) * np.sin(r / f32(7.0) + f32(3.0) * theta + f32(a.sulcus_phase))
    wave = np.cos(phase)
    g = a.scale
    midline = np.abs(x)  # left-right pairs: one ellipse on |x| draws both
    falx_clear = (y < f32(-42 * g)) | (y > f32(38 * g))  # the falx stops where the ventricles sit
    falx = _inside(f32(0.7) - np.abs(x - f32(0.6) * np.sin(y / f32(12.0))), spacing) * falx_clear

    return _Canvas(
        spacing=spacing,
        background=background,
        box=box,
        x=x,
        y=y,
        r=r,
        reach=reach,
        sulcus_line=np.clip((wave - f32(0.75)) / f32(0.25), 0.0, 1.0),
        sulcus_wide=np.clip((wave - f32(0.1)) / f32(0.9), 0.0, 1.0),
        sulcus_depth=f32(8.0) + f32(5.0) * np.sin(f32(2.0) * theta + r / f32(13.0) + f32(a.sulcus_phase)),
        texture=cv2.resize(a.texture, (x.shape[1], x.shape[0]), interpolation=cv2.INTER_CUBIC),
        deep_gray=_ellipse(midline, y, (22 * g, -2 * g), (8.5 * g, 13 * g), spacing),
        falx=falx,
        sinus_x=np.where(y > 0, midline, f32(np.inf)),
        choroid=_ellipse(midline, y, (13 * g, 20 * g), (1.8, 1.8), spacing),
        pineal=_ellipse(x, y, (0.0, 12 * g), (2.2, 2.2), spacing),
        bleed_fields=tuple(_bleed_field(b, a, x, y, theta) for b in study.bleeds),
    )


def _bleed_field(bleed: _Bleed, a: _Anatomy, x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray | None:
    """The slice-independent part of a bleed's shape on the grid."""
    if bleed.subtype in ("epidural", "subdural", "subarachnoid"):
        return (_angle_off(theta, bleed.angle) / np.float32(bleed.extent)) ** 2  # (angle off centre / half-width)^2
    if bleed.subtype == "intraparenchymal":
        cx = bleed.extent * a.semi_axes[0] * math.cos(bleed.angle)
        cy = bleed.extent * a.semi_axes[1] * math.sin(bleed.angle)
        dx, dy = x - np.float32(cx), y - np.float32(cy)
        phi = np.arctan2(dy, dx)
        ragged = 1 + 0.12 * np.cos(2 * phi + bleed.angle) + 0.08 * np.cos(3 * phi - 2 * bleed.angle)
        return np.hypot(dx, dy) / ragged  # mm, irregular distance from the centre
    return None  # intraventricular: follows the ventricles of each slice


def _ventricles(a: _Anatomy, canvas: _Canvas, h: float) -> list[tuple[np.ndarray, float, float]]:
    """Per lateral ventricle (right, left): (coverage 0..1, centre y mm, half-length mm); [] outside their heights.

    Two bent ellipses whose size, gap and bend follow the height: small near the ends
    of their range, a butterfly mid-way, straighter bodies towards the vertex.
    """
    low, high = VENTRICLE_HEIGHTS
    if not low <= h <= high:
        return []
    t = max(0.3, math.sin(math.pi * (h - low) / (high - low)))
    g = a.scale
    cy = -6.0 * g
    half_len, half_wid, gap = g * (10 + 20 * t), g * (2.5 + 4.5 * t), g * (3 + 7 * t)
    bend = 0.012 * (1.3 - h) / g
    along = canvas.y - np.float32(cy)
    sway = np.float32(bend) * along**2
    along_sq = (along / np.float32(half_len)) ** 2
    sides = []
    for side in (-1, 1):
        across = np.float32(side) * canvas.x - np.float32(gap) - sway
        d = np.sqrt((across / np.float32(half_wid)) ** 2 + along_sq)
        sides.append((_inside((1 - d) * np.float32(half_wid), canvas.spacing), cy, half_len))
    return sides


def _blend(base: np.ndarray, value: float | np.ndarray, share: np.ndarray) -> None:
    """base <- base + (value - base) * share, in place."""
    base += (value - base) * share


def _sulcal_csf(canvas: _Canvas, inner: np.ndarray) -> np.ndarray:
    """Coverage 0..1 of the CSF in the sulci and the thin layer under the inner table (where SAH goes)."""
    sulci = canvas.sulcus_line * _inside(canvas.sulcus_depth - inner, 2.0)
    return np.maximum(sulci, _inside(1.0 - inner, canvas.spacing))


def _brain(
    a: _Anatomy,
    canvas: _Canvas,
    h: float,
    inner: np.ndarray,
    sulcal: np.ndarray,
    ventricles: list[tuple[np.ndarray, float, float]],
) -> np.ndarray:
    """Normal brain HU inside the inner table (box-shaped), before bleeds and noise."""
    sp = canvas.spacing
    gray = _inside(np.float32(a.cortex) + np.float32(4.0) * canvas.sulcus_wide - inner, 1.5)
    if 0.25 <= h <= 0.55:
        gray = np.maximum(gray, canvas.deep_gray)
    tissue = np.float32(a.white_hu) + np.float32(a.gray_hu - a.white_hu) * gray + canvas.texture
    csf = sulcal
    for coverage, _, _ in ventricles:
        csf = np.maximum(csf, coverage)
    _blend(tissue, a.csf_hu, csf)
    # Normally dense structures, so that 50-90 HU pixels alone do not mean blood.
    if h > 0.25:
        _blend(tissue, a.falx_hu, canvas.falx)
        _blend(tissue, a.sinus_hu, _inside(np.float32(0.6) * (np.float32(7.0) - inner) - canvas.sinus_x, sp))
    if a.choroid_hu and 0.4 <= h <= 0.65:
        _blend(tissue, a.choroid_hu, canvas.choroid)
    if a.pineal_hu and 0.32 <= h <= 0.45:
        _blend(tissue, a.pineal_hu, canvas.pineal)
    return tissue


def _bleed_share(
    bleed: _Bleed,
    fld: np.ndarray | None,
    k: int,
    canvas: _Canvas,
    inner: np.ndarray,
    sulcal: np.ndarray,
    ventricles: list[tuple[np.ndarray, float, float]],
) -> np.ndarray:
    """Coverage 0..1 (box-shaped) of one bleed on slice k: the share of each pixel's brain HU it replaces."""
    sp = canvas.spacing
    f = bleed.taper(k)
    if bleed.subtype in ("epidural", "subdural"):
        spread = fld / np.float32((0.6 + 0.4 * f) ** 2)
        profile = np.clip(1 - spread, 0.0, 1.0)
        if bleed.subtype == "epidural":
            profile = np.sqrt(profile)  # lens: rounded, steep ends; subdural: long tapering crescent
        width = np.float32(bleed.size * f) * profile
        return _inside(width - inner, sp) * np.clip(width / np.float32(sp), 0.0, 1.0)
    if bleed.subtype == "subarachnoid":
        sector = np.clip(3 * (1 - fld / np.float32((0.5 + 0.5 * f) ** 2)), 0.0, 1.0)
        return sector * np.maximum(sulcal, _inside(2.0 - inner, sp))  # sulci and the cortical surface
    if bleed.subtype == "intraparenchymal":
        return _inside(np.float32(bleed.size * f) - fld, sp)
    share = np.zeros_like(canvas.x)  # intraventricular
    for side, (coverage, cy, half_len) in zip((-1, 1), ventricles):
        if bleed.side in (0, side):
            level = cy + half_len * (1 - 2 * bleed.extent * f)
            share = np.maximum(share, coverage * _inside(canvas.y - np.float32(level), sp))
    return share


def _add_bleed(tissue: np.ndarray, bleed: _Bleed, share: np.ndarray, fld: np.ndarray | None, k: int,
               canvas: _Canvas) -> None:
    """Paint one bleed of coverage `share` (_bleed_share) into `tissue` (box-shaped HU, in place) on slice k."""
    if bleed.subtype == "intraparenchymal":  # oedema halo around the clot (not part of the bleed's coverage)
        radius = np.float32(bleed.size * bleed.taper(k))
        _blend(tissue, tissue - 7.0, _inside(np.float32(1.4) * radius - fld, 2 * canvas.spacing))
    _blend(tissue, bleed.hu, share)


def _render(
    study: _Study, canvas: _Canvas, k: int, rng: np.random.Generator, masks: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(HU (rows, cols) float32 of slice k, its masks (_slice_masks) when `masks`, else {})."""
    a, sp, f32 = study.anatomy, canvas.spacing, np.float32
    h = (k + 0.5) / len(study.image_ids)
    depth = f32(_head_scale(h)) * canvas.reach - canvas.r  # mm inside the scalp surface
    inner = depth - f32(a.scalp + a.skull)  # mm inside the inner table
    ventricles = _ventricles(a, canvas, h)
    sulcal = _sulcal_csf(canvas, inner)
    tissue = _brain(a, canvas, h, inner, sulcal, ventricles)
    shares: dict[str, np.ndarray] = {}
    for bleed, fld in zip(study.bleeds, canvas.bleed_fields):
        if bleed.first <= k <= bleed.last:
            share = _bleed_share(bleed, fld, k, canvas, inner, sulcal, ventricles)
            _add_bleed(tissue, bleed, share, fld, k, canvas)
            shares[bleed.subtype] = np.maximum(shares[bleed.subtype], share) if bleed.subtype in shares else share

    u = np.clip((depth - f32(a.scalp)) / f32(a.skull), 0.0, 1.0)
    bone = f32(1500.0) - f32(2600.0) * u * (1 - u)  # dense outer and inner tables, ~850 HU diploe
    head = _inside(depth, sp)
    brain = _inside(inner, sp)
    out = canvas.background[canvas.box].copy()
    _blend(out, f32(a.scalp_hu), head)
    _blend(out, bone, _inside(depth - f32(a.scalp), sp))
    _blend(out, tissue, brain)
    rows, cols = out.shape
    noise = rng.standard_normal(((rows + 1) // 2 + 1, (cols + 1) // 2 + 1), dtype=f32) * f32(a.noise)
    out += cv2.resize(noise, (cols, rows), interpolation=cv2.INTER_LINEAR) * head  # correlated, like CT noise

    image = canvas.background.copy()
    image[canvas.box] = out
    return image, (_slice_masks(canvas, brain, shares) if masks else {})


def _slice_masks(canvas: _Canvas, brain: np.ndarray, shares: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(rows, cols) bool masks of one slice: each bleeding subtype (SUBTYPES order), then HEAD_MASK.

    A pixel belongs to a bleed when the bleed makes up at least half of it (share x brain coverage >= 0.5),
    to the head when at least half of it lies inside the inner table: the pixel's centre lies inside the
    shape, as `_inside` draws edges (and as a reader would outline it). `> 0` would add rims and sectors where
    the blend moved a pixel by less than the noise (SAH's soft sector edges: a few pixels at 128 px)."""

    def full(part: np.ndarray) -> np.ndarray:
        mask = np.zeros(canvas.background.shape, dtype=bool)
        mask[canvas.box] = part
        return mask

    masks = {name: full(shares[name] * brain >= 0.5) for name in SUBTYPES if name in shares}
    masks[HEAD_MASK] = full(brain >= 0.5)
    return masks


def _write_masks(path: Path, masks: Mapping[str, np.ndarray]) -> None:
    """An .npz that np.load reads, written with a fixed timestamp so that a config rewrites the same bytes
    (np.savez_compressed stamps each member with the current time)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, mask in masks.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(mask), allow_pickle=False)


def read_masks(out_dir: str | Path, image_id: str) -> dict[str, np.ndarray]:
    """The masks that write_dataset wrote for one image with PhantomConfig(masks=True): (rows, cols) bool each,
    on the DICOM's pixel grid (whatever its size).

    Keys: each subtype that bleeds on the slice (SUBTYPES order), "any" (their union) when one does, and
    HEAD_MASK (inside the inner table) always. A negative slice gives {HEAD_MASK: ...} only.
    """
    path = Path(out_dir) / MASKS_DIR / f"{image_id}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no masks for {image_id}; write the dataset with PhantomConfig(masks=True)")
    with np.load(path, allow_pickle=False) as stored:
        saved = {name: stored[name] for name in stored.files}
    masks = {name: saved[name] for name in SUBTYPES if name in saved}
    if masks:
        masks["any"] = np.logical_or.reduce(list(masks.values()))
    masks[HEAD_MASK] = saved[HEAD_MASK]
    return masks


def mask_to_input(mask: np.ndarray, size: int, min_share: float = 0.0) -> np.ndarray:
    """A (rows, cols) mask on the model's (size, size) input grid, in raysys.presets' geometry (resize_square:
    the longer side area-resized to `size`, the shorter one kept in proportion and centred between padding).

    (size, size) bool: the input pixels of which more than `min_share` is mask (0: any overlap, so that a
    bleed thinner than an input pixel still marks the pixel that shows it); padding is never mask."""
    if not 0.0 <= min_share < 1.0:
        raise ValueError(f"min_share must lie in [0, 1), got {min_share}")
    return resize_square(np.asarray(mask, dtype=np.float32), size, fill=0.0) > min_share


# --- DICOM files -------------------------------------------------------------------------------

# Pixel module per storage: default 12-bit unsigned like RSNA; signed 16-bit where values go below 0.
_STORAGE = {
    "unsigned": (12, 0, "-1024"),  # BitsStored, PixelRepresentation, RescaleIntercept
    "padded": (16, 1, "-1024"),
    "signed": (16, 1, "0"),
    "wrapped_intercept": (12, 0, "0"),
}


def _encode(hu: np.ndarray, storage: str) -> bytes:
    """Rounded HU -> little-endian stored values that read back (through raysys.dicom) as those HU."""
    values = np.rint(hu).astype(np.int32)
    if storage == "unsigned":
        return np.clip(values + 1024, 0, 4095).astype("<u2").tobytes()
    if storage == "padded":
        return (values + 1024).astype("<i2").tobytes()
    if storage == "signed":
        return values.astype("<i2").tobytes()
    if storage == "wrapped_intercept":
        # Inverse of the RSNA repair (stored + 1000, minus 4096 when >= 4096, intercept -1000):
        # HU in [-1000, 3095] is stored as HU mod 4096, so negative HU sit at the top of 12 bits.
        return np.mod(np.clip(values, WRAP_LOW_HU, WRAP_HIGH_HU), 4096).astype("<u2").tobytes()
    raise ValueError(f"unknown storage {storage!r}; expected one of {sorted(_STORAGE)}")


def _set_uid(ds: Dataset, tag: int, value: str) -> None:
    """RSNA puts `ID_...` strings in UI fields; store them as RSNA does, without pydicom's validation warning."""
    ds[tag] = DataElement(tag, "UI", value, validation_mode=pydicom.config.IGNORE)


def _template(study: _Study, spacing: float) -> Dataset:
    # A complete File Meta group, written as is: save_as(enforce_file_format=True) would copy the
    # `ID_...` SOPInstanceUID over the numeric MediaStorageSOPInstanceUID (RSNA keeps them apart) and warn.
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0  # pydicom fills in the real length when writing
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "raysys-phantom"
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientName = "Phantom^Patient"  # a name that must never show up in logs or outputs
    ds.PatientID = study.patient_id
    _set_uid(ds, 0x0020000D, study.study_id)
    _set_uid(ds, 0x0020000E, study.series_id)
    tilt = study.tilt
    ds.ImageOrientationPatient = ["1", "0", "0", "0", f"{math.cos(tilt):.6f}", f"{-math.sin(tilt):.6f}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = [f"{spacing:.8g}"] * 2
    ds.BitsAllocated = 16
    ds.WindowCenter, ds.WindowWidth = study.window
    ds.RescaleSlope = "1"
    return ds


def _fill(ds: Dataset, study: _Study, k: int, image: np.ndarray, spacing: float, storage: str, size: int) -> None:
    image_id = study.image_ids[k]
    rows, cols = image.shape
    bits, signed, intercept = _STORAGE[storage]
    _set_uid(ds, 0x00080018, image_id)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[image_id])  # numeric, as in RSNA
    ds.InstanceNumber = k + 1
    x0, y0 = -(size - 1) / 2 * spacing, -(size - 1) / 2 * spacing  # the corner of the study's size x size slices
    # A slice of another size (the "size" quirk) lies in the same plane: its corner moves along the row (1, 0, 0)
    # and column (0, cos, -sin) directions, so a tilted series keeps one geometry.
    dx, dy = (cols - size) / 2 * spacing, (rows - size) / 2 * spacing
    x, y, z = x0 - dx, y0 - dy * math.cos(study.tilt), study.z0 + SLICE_GAP_MM * k + dy * math.sin(study.tilt)
    ds.ImagePositionPatient = [f"{x:.4f}", f"{y:.4f}", f"{z:.4f}"]
    ds.Rows, ds.Columns = rows, cols
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, signed
    ds.RescaleIntercept = intercept
    ds[0x7FE00010] = DataElement(0x7FE00010, "OW", _encode(image, storage))


def _odd_shape(size: int) -> tuple[int, int]:
    return round(size * ODD_SHAPE_512[0] / 512), round(size * ODD_SHAPE_512[1] / 512)


def write_dataset(out_dir: str | Path, config: PhantomConfig) -> pd.DataFrame:
    """Write `out_dir/dicoms/ID_*.dcm` and `out_dir/labels.csv` (RSNA layout); return the dataset's frame.

    With `config.masks`, also `out_dir/masks/ID_*.npz` per image (see read_masks); the DICOM files and
    labels are the same bytes either way.

    The frame is indexed by image_id with the LABELS columns (int8) plus patient_id,
    study_id, series_id, z (mm), path and quirk ("" for a clean file). Rerunning a config
    rewrites the same bytes; a `dicoms` folder holding other .dcm files is refused.
    """
    out = Path(out_dir)
    dicoms = out / "dicoms"
    studies = _plan(config)
    frame = _frame(studies, _assign_quirks(config, [i for s in studies for i in s.image_ids]))
    frame.insert(len(frame.columns) - 1, "path", [str(dicoms / f"{i}.dcm") for i in frame.index])
    if dicoms.is_dir():
        stale = sorted(p.name for p in dicoms.glob("*.dcm") if p.stem not in frame.index)
        if stale:
            raise FileExistsError(f"{dicoms} holds {len(stale)} .dcm files of another dataset (e.g. {stale[0]})")
    dicoms.mkdir(parents=True, exist_ok=True)
    if config.masks:
        (out / MASKS_DIR).mkdir(exist_ok=True)

    spacing = FIELD_OF_VIEW_MM / config.size
    quirks = frame["quirk"]
    for study in studies:
        canvas = _rasterise(study, config.size, config.size, spacing)
        ds = _template(study, spacing)
        for k, image_id in enumerate(study.image_ids):
            quirk = quirks[image_id]
            rng = np.random.default_rng([config.seed, study.index, _NOISE, k])
            if quirk == "size":
                image, masks = _render(study, _rasterise(study, *_odd_shape(config.size), spacing), k, rng, config.masks)
            else:
                image, masks = _render(study, canvas, k, rng, config.masks)
            storage = quirk if quirk in ("signed", "wrapped_intercept") else "padded" if study.padded else "unsigned"
            _fill(ds, study, k, image, spacing, storage, config.size)
            path = dicoms / f"{image_id}.dcm"
            ds.save_as(path)
            if quirk == "truncated":  # an interrupted copy: the file ends half-way through its pixels
                data = path.read_bytes()
                path.write_bytes(data[: len(data) - image.size])
            if config.masks:
                _write_masks(out / MASKS_DIR / f"{image_id}.npz", masks)

    labels = out / "labels.csv"
    write_labels(labels, frame.sort_index())
    with open(labels, "a") as f:  # RSNA stage 2 train repeats a few images' rows verbatim
        for image_id in frame.index[frame["quirk"] == "duplicate_rows"]:
            for name in LABELS:
                f.write(f"{image_id}_{name},{frame.at[image_id, name]}\n")
    return frame
