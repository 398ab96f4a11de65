"""raysys.windowing: windows, presets, and HU -> (C, S, S) stacks checked against plain numpy."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from raysys.windowing import (
    AIR_HU,
    BONE,
    BRAIN,
    DEFAULT_WINDOWS,
    NAMED_WINDOWS,
    SOFT_TISSUE,
    SUBDURAL,
    Window,
    apply_windows,
    format_windows,
    parse_windows,
    resize_square,
    window_pixels,
    window_stack,
)

LUNG = Window(center=-600, width=1500)  # air (-1024 HU) lands inside it, so the padding value shows


# --- independent reference: float64 numpy --------------------------------------------------------


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) box-filter weights: output cell i covers [i*s, (i+1)*s) of the input, s = n_in/n_out."""
    assert n_out <= n_in, "area averaging is defined for shrinking"
    s = n_in / n_out
    edges = np.arange(n_out + 1) * s
    j = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], j[None, :] + 1) - np.maximum(edges[:-1, None], j[None, :])
    return np.clip(overlap, 0, None) / s


def area_resize(img: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """Area resize in float64: exact box averaging when shrinking, OpenCV's INTER_AREA rule when growing."""
    img = np.asarray(img, np.float64)
    h, w = img.shape
    if nh <= h and nw <= w:
        return area_weights(h, nh) @ img @ area_weights(w, nw).T
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)


def reference_square(hu: np.ndarray, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """HU placed in `box` = (top, left, height, width) of a size x size air canvas."""
    top, left, nh, nw = box
    out = np.full((size, size), -1024.0)
    out[top : top + nh, left : left + nw] = area_resize(hu, nh, nw)
    return out


def reference_windows(hu: np.ndarray, windows) -> np.ndarray:
    """(C, H, W) float64 in [0, 1]."""
    return np.stack([np.clip((hu - (w.center - w.width / 2)) / w.width, 0.0, 1.0) for w in windows])


def assert_close_uint8(out: np.ndarray, expected01: np.ndarray) -> None:
    """Within one uint8 step everywhere, and rounded (not truncated) almost everywhere."""
    assert out.dtype == np.uint8
    scaled = expected01 * 255.0
    diff = out.astype(np.float64) - scaled
    assert np.abs(diff).max() <= 1.0
    assert np.mean(out != np.rint(scaled)) < 0.01


def assert_close_float(out: np.ndarray, expected01: np.ndarray) -> None:
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, expected01, rtol=0, atol=1 / 255)
    np.testing.assert_allclose(out, expected01, rtol=0, atol=1e-4)  # in practice far tighter


def ct_like(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth structure plus noise over the whole CT range, float32 HU."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    head = np.where((yy - h / 2) ** 2 / (0.4 * h) ** 2 + (xx - w / 2) ** 2 / (0.4 * w) ** 2 < 1, 40.0, -1000.0)
    return (head + rng.normal(0, 300, size=shape)).clip(-1100, 3000).astype(np.float32)


# --- Window ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [0, -1, -80.5, math.nan, math.inf, -math.inf])
def test_bad_width_is_rejected_with_its_value(width):
    with pytest.raises(ValueError, match="width") as info:
        Window(40, width)
    assert str(width) in str(info.value)


@pytest.mark.parametrize("center", [math.nan, math.inf, -math.inf])
def test_non_finite_center_is_rejected_with_its_value(center):
    with pytest.raises(ValueError, match="center") as info:
        Window(center, 80)
    assert str(center) in str(info.value)


def test_window_bounds():
    assert (BRAIN.low, BRAIN.high) == (0, 80)
    assert (Window(-600, 1500).low, Window(-600, 1500).high) == (-1350, 150)
    assert Window(0.5, 1e-3).width == 1e-3


def test_window_is_a_frozen_value():
    assert Window(40, 80) == Window(40.0, 80.0) == BRAIN
    assert hash(Window(40.0, 80.0)) == hash(BRAIN)
    with pytest.raises(AttributeError):
        BRAIN.center = 50  # type: ignore[misc]


def test_presets():
    assert (BRAIN.center, BRAIN.width) == (40, 80)
    assert (SUBDURAL.center, SUBDURAL.width) == (80, 200)
    assert (SOFT_TISSUE.center, SOFT_TISSUE.width) == (40, 380)
    assert (BONE.center, BONE.width) == (600, 2800)
    assert NAMED_WINDOWS == {"brain": BRAIN, "subdural": SUBDURAL, "soft_tissue": SOFT_TISSUE, "bone": BONE}
    assert DEFAULT_WINDOWS == (BRAIN, SUBDURAL, SOFT_TISSUE)
    assert AIR_HU == -1024.0


# --- parse_windows / format_windows ---------------------------------------------------------------


def test_parse_names():
    assert parse_windows("brain,subdural,soft_tissue") == (BRAIN, SUBDURAL, SOFT_TISSUE)
    assert parse_windows(" bone , brain ") == (BONE, BRAIN)
    assert parse_windows(["subdural", BONE, "40/80"]) == (SUBDURAL, BONE, BRAIN)
    assert parse_windows(("bone",)) == (BONE,)


def test_parse_center_width():
    assert parse_windows("40/80,80/200") == (Window(40, 80), Window(80, 200))
    assert parse_windows("-600/1500") == (Window(-600, 1500),)
    assert parse_windows("12.5/0.25") == (Window(12.5, 0.25),)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("brian", "brian"),
        ("brain,", "''"),
        ("", "''"),
        ("40/0", "40/0"),
        ("40/-5", "-5"),
        ("abc/80", "abc/80"),
        ("40/80/3", "40/80/3"),
        ("nan/80", "nan/80"),
        ("40/inf", "40/inf"),
        ([], "no windows"),
    ],
)
def test_parse_errors_name_the_bad_item(spec, needle):
    with pytest.raises(ValueError) as info:
        parse_windows(spec)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "windows, text",
    [
        ((BRAIN, SUBDURAL, SOFT_TISSUE), "brain,subdural,soft_tissue"),
        ((BONE,), "bone"),
        ((Window(40, 80), Window(40.0, 380.0)), "brain,soft_tissue"),
        ((Window(-600, 1500), Window(50, 150)), "-600/1500,50/150"),
        ((Window(12.5, 0.25),), "12.5/0.25"),
    ],
)
def test_format_windows(windows, text):
    assert format_windows(windows) == text
    assert parse_windows(text) == tuple(windows)


@pytest.mark.parametrize(
    "windows",
    [
        (BRAIN, Window(-600, 1500), BONE),
        (Window(1234.5678, 100.0),),  # more digits than :g keeps
        (Window(0.1, 1e-7), Window(-1e6, 3.3333333333)),
        (Window(40.000001, 80),),
    ],
)
def test_format_parse_round_trip(windows):
    assert parse_windows(format_windows(windows)) == windows


# --- apply_windows: clip and scale ----------------------------------------------------------------


def test_apply_windows_against_numpy():
    hu = np.linspace(-2000, 4000, 6001, dtype=np.float32).reshape(1, -1)
    windows = (BRAIN, SUBDURAL, SOFT_TISSUE, BONE, LUNG)
    expected = reference_windows(hu.astype(np.float64), windows)
    out8 = apply_windows(hu, windows)
    assert out8.shape == (5, 1, 6001)
    assert_close_uint8(out8, expected)
    assert_close_float(apply_windows(hu, windows, dtype=np.float32), expected)


def test_apply_windows_edges():
    hu = np.array([[BRAIN.low - 1, BRAIN.low, BRAIN.center, BRAIN.high, BRAIN.high + 1]], np.float32)
    out = apply_windows(hu, (BRAIN,), dtype=np.float32)[0, 0]
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-7)
    out8 = apply_windows(hu, (BRAIN,))[0, 0]
    assert list(out8[[0, 1, 3, 4]]) == [0, 0, 255, 255] and out8[2] in (127, 128)


def test_apply_windows_rejects_other_dtypes():
    with pytest.raises(ValueError, match="float64"):
        apply_windows(np.zeros((4, 4), np.float32), dtype=np.float64)


# --- window_stack: area resize, air padding, then windows -----------------------------------------

# (rows, cols), size, expected content box (top, left, height, width), worked out by hand:
# the long side becomes `size`, the short side round(short * size / long), centred (floor on top/left).
GEOMETRY = [
    ((512, 512), 256, (0, 0, 256, 256)),  # 2x2 blocks
    ((512, 512), 224, (0, 0, 224, 224)),  # non-integer factor
    ((768, 768), 256, (0, 0, 256, 256)),
    ((490, 638), 256, (29, 0, 197, 256)),  # 490 * 256 / 638 = 196.6 -> 197; 59 rows of air: 29 + 30
    ((638, 490), 256, (0, 29, 256, 197)),
    ((404, 430), 256, (7, 0, 241, 256)),  # 404 * 256 / 430 = 240.5 -> 241; 15 rows of air: 7 + 8
    ((430, 404), 256, (0, 7, 256, 241)),
    ((490, 638), 512, (59, 0, 393, 512)),  # 393.2 -> 393; 119 rows: 59 + 60
    ((256, 256), 256, (0, 0, 256, 256)),  # no resize at all
    ((64, 48), 256, (0, 32, 256, 192)),  # upscaling, 4x
    ((30, 30), 299, (0, 0, 299, 299)),  # upscaling, non-integer
]


@pytest.mark.parametrize("shape, size, box", GEOMETRY)
def test_window_stack_matches_reference(shape, size, box):
    hu = ct_like(shape, seed=shape[0] + size)
    windows = (BRAIN, SUBDURAL, SOFT_TISSUE, LUNG)
    expected = reference_windows(reference_square(hu, size, box), windows)
    out8 = window_stack(hu, windows, size=size)
    assert out8.shape == (4, size, size) and out8.dtype == np.uint8
    assert_close_uint8(out8, expected)
    outf = window_stack(hu, windows, size=size, dtype=np.float32)
    assert outf.shape == (4, size, size) and outf.dtype == np.float32
    assert_close_float(outf, expected)


@pytest.mark.parametrize("shape, size, box", [g for g in GEOMETRY if g[2][2] != g[2][3]])
def test_padding_is_air_and_centred(shape, size, box):
    # A bright image: anything that is not -1024 HU in the LUNG channel is content, not padding.
    hu = np.full(shape, 100.0, np.float32)
    hu_out = resize_square(hu, size)
    top, left, nh, nw = box
    inside = np.zeros((size, size), bool)
    inside[top : top + nh, left : left + nw] = True
    assert np.all(hu_out[~inside] == -1024.0)
    np.testing.assert_allclose(hu_out[inside], 100.0, atol=1e-3)
    padding = [top, size - top - nh] if nh < size else [left, size - left - nw]
    assert abs(padding[0] - padding[1]) <= 1  # centred
    lung = window_stack(hu, (LUNG,), size=size)[0]
    air8 = round((-1024 - LUNG.low) / LUNG.width * 255)  # 55, not 0: the fill is really -1024
    assert air8 == 55
    assert np.all(lung[~inside] == air8)


def test_aspect_ratio_is_kept():
    # A filled disc stays a disc: its extent in rows and columns is equal after the resize.
    h, w = 300, 450
    yy, xx = np.mgrid[0:h, 0:w]
    disc = np.where((yy - 150) ** 2 + (xx - 225) ** 2 < 120**2, 1000.0, -1024.0).astype(np.float32)
    out = resize_square(disc, 150)
    rows = np.flatnonzero((out > 0).any(axis=1))
    cols = np.flatnonzero((out > 0).any(axis=0))
    assert abs(len(rows) - len(cols)) <= 1 and 78 <= len(rows) <= 82  # 240 px * 150/450 = 80


def test_window_stack_default_windows_and_size():
    hu = ct_like((512, 512), seed=5)
    out = window_stack(hu)
    assert out.shape == (3, 256, 256) and out.dtype == np.uint8 and out.flags.c_contiguous
    expected = reference_windows(reference_square(hu, 256, (0, 0, 256, 256)), DEFAULT_WINDOWS)
    assert_close_uint8(out, expected)


@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.int32])
def test_window_stack_accepts_other_input_dtypes(dtype):
    hu = np.rint(ct_like((100, 80), seed=6)).astype(dtype)
    expected = reference_windows(reference_square(hu, 64, (0, 6, 64, 51)), (BRAIN, BONE))  # 80*64/100 = 51.2
    assert_close_uint8(window_stack(hu, (BRAIN, BONE), size=64), expected)


def test_window_stack_non_contiguous_input():
    hu = ct_like((200, 300), seed=7)
    view = hu.T  # (300, 200), Fortran-ordered
    expected = reference_windows(reference_square(view, 150, (0, 25, 150, 100)), (SUBDURAL,))
    assert_close_uint8(window_stack(view, (SUBDURAL,), size=150), expected)
    strided = hu[::2, ::3]  # (100, 100) with gaps
    expected = reference_windows(reference_square(strided, 100, (0, 0, 100, 100)), (SUBDURAL,))
    assert_close_uint8(window_stack(strided, (SUBDURAL,), size=100), expected)


def test_upscaling_a_small_image():
    hu = np.full((16, 16), 60.0, np.float32)
    hu[4:12, 4:12] = 1000.0
    out = window_stack(hu, (BRAIN, BONE), size=256, dtype=np.float32)
    assert out.shape == (2, 256, 256)
    expected = reference_windows(reference_square(hu, 256, (0, 0, 256, 256)), (BRAIN, BONE))
    assert_close_float(out, expected)
    assert out[0, 0, 0] == pytest.approx(0.75)  # 60 HU in BRAIN: (60 - 0) / 80
    assert out[1, 128, 128] == pytest.approx((1000 - BONE.low) / BONE.width, abs=1e-6)


def test_one_pixel_image():
    out = window_stack(np.array([[40.0]]), (BRAIN,), size=8, dtype=np.float32)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_window_stack_leaves_its_input_alone():
    hu = ct_like((256, 256), seed=8)
    before = hu.copy()
    window_stack(hu, size=256)
    window_pixels(hu, 2.0, -1024.0, size=256)
    np.testing.assert_array_equal(hu, before)


def test_results_do_not_share_memory():
    # resize_square reuses a scratch buffer per thread; a returned image must never be that buffer.
    a_pixels = np.arange(64 * 64, dtype=np.int16).reshape(64, 64)
    first = resize_square(a_pixels, 64)
    expected = a_pixels.astype(np.float32)
    second = resize_square(a_pixels * 2, 64)
    np.testing.assert_array_equal(first, expected)
    assert not np.shares_memory(first, second)
    third = resize_square(a_pixels, 64, slope=2.0, intercept=-1024.0)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(third, expected * 2 - 1024)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3)), np.zeros(16)])
def test_window_stack_rejects_non_2d(bad):
    with pytest.raises(ValueError, match="2-D"):
        window_stack(bad)


@pytest.mark.parametrize("size", [0, -3])
def test_window_stack_rejects_bad_size(size):
    with pytest.raises(ValueError, match=str(size)):
        window_stack(np.zeros((4, 4), np.float32), size=size)


def test_window_stack_rejects_bad_dtype():
    with pytest.raises(ValueError, match="uint8 or float32"):
        window_stack(np.zeros((4, 4), np.float32), dtype=np.int16)


# --- window_pixels: stored pixels + modality transform --------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, slope, intercept",
    [
        ((512, 512), np.uint16, 1.0, -1024.0),
        ((512, 512), np.int16, 1.0, 0.0),
        ((490, 638), np.uint16, 2.0, -1024.0),
        ((430, 404), np.int16, 0.5, -1000.0),
        ((64, 48), np.int32, 1.0, -1024.0),
        ((256, 256), np.uint16, 1.0, -1024.0),  # no resize
        ((300, 200), np.float32, 2.0, -1024.0),
    ],
)
@pytest.mark.parametrize("out_dtype", [np.uint8, np.float32])
def test_window_pixels_equals_window_stack_of_hu(shape, dtype, slope, intercept, out_dtype):
    rng = np.random.default_rng(shape[0])
    lo = 0 if dtype == np.uint16 else -1024
    pixels = rng.integers(lo, lo + 4096, size=shape).astype(dtype)
    windows = (BRAIN, SUBDURAL, SOFT_TISSUE, LUNG)  # LUNG: the padding must be air after the rescale
    hu = pixels.astype(np.float64) * slope + intercept
    got = window_pixels(pixels, slope, intercept, windows, size=256, dtype=out_dtype)
    via_hu = window_stack(hu.astype(np.float32), windows, size=256, dtype=out_dtype)
    assert got.shape == (4, 256, 256) and got.dtype == np.dtype(out_dtype)
    if out_dtype == np.float32:
        np.testing.assert_allclose(got, via_hu, atol=1e-5)
    else:
        assert np.abs(got.astype(int) - via_hu.astype(int)).max() <= 1
        assert np.mean(got != via_hu) < 0.001
    # and both agree with the float64 reference
    h, w = shape
    scale = 256 / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    box = ((256 - nh) // 2, (256 - nw) // 2, nh, nw)
    expected = reference_windows(reference_square(hu, 256, box), windows)
    if out_dtype == np.float32:
        assert_close_float(got, expected)
    else:
        assert_close_uint8(got, expected)


def test_window_pixels_default_windows():
    pixels = np.random.default_rng(9).integers(0, 4096, size=(512, 512)).astype(np.uint16)
    got = window_pixels(pixels, 1.0, -1024.0)
    assert got.shape == (3, 256, 256) and got.dtype == np.uint8
    expected = reference_windows(reference_square(pixels.astype(np.float64) - 1024, 256, (0, 0, 256, 256)), DEFAULT_WINDOWS)
    assert_close_uint8(got, expected)


def test_scratch_buffers_are_bounded_whatever_the_shapes():
    from raysys import windowing

    rng = np.random.default_rng(0)
    for i in range(40):  # a client sending slices of 40 different shapes
        pixels = rng.integers(0, 2000, (60 + i, 70 + 2 * i), dtype=np.int16)
        got = window_pixels(pixels, 1.0, -1024.0, DEFAULT_WINDOWS, 32)
        assert got.shape == (3, 32, 32)
    assert len(windowing._buffers.cache) <= windowing.SCRATCH_SHAPES
    # A shape seen again after others reuses a buffer and still gives the same pixels.
    pixels = rng.integers(0, 2000, (60, 70), dtype=np.int16)
    assert np.array_equal(window_pixels(pixels, 1.0, -1024.0, DEFAULT_WINDOWS, 32),
                          window_pixels(pixels.copy(), 1.0, -1024.0, DEFAULT_WINDOWS, 32))
