"""CT windows: Window(center, width), named presets, and HU -> stacked window channels."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

AIR_HU = -1024.0  # what a scanner reports for air; fills the padding of non-square images

# cv2 would otherwise start its own thread pool inside every Ray worker process.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class Window:
    """A CT display window in Hounsfield units: [center - width/2, center + width/2]."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.center):
            raise ValueError(f"window center must be finite, got {self.center}")
        if not (math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"window width must be > 0, got {self.width}")

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        return self.center + self.width / 2


BRAIN = Window(center=40, width=80)
SUBDURAL = Window(center=80, width=200)
SOFT_TISSUE = Window(center=40, width=380)
BONE = Window(center=600, width=2800)
NAMED_WINDOWS: dict[str, Window] = {"brain": BRAIN, "subdural": SUBDURAL, "soft_tissue": SOFT_TISSUE, "bone": BONE}
DEFAULT_WINDOWS: tuple[Window, ...] = (BRAIN, SUBDURAL, SOFT_TISSUE)  # the reference recipe's three channels


def parse_windows(spec: str | Iterable[str | Window]) -> tuple[Window, ...]:
    """Windows from "brain,subdural,soft_tissue", "40/80,80/200", or a list of names/Windows."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    windows = []
    for item in items:
        if isinstance(item, Window):
            windows.append(item)
            continue
        text = str(item).strip()
        if text in NAMED_WINDOWS:
            windows.append(NAMED_WINDOWS[text])
        elif "/" in text:
            center, _, width = text.partition("/")
            try:
                windows.append(Window(float(center), float(width)))
            except ValueError as e:
                raise ValueError(f"bad window {text!r}: {e}") from None
        else:
            raise ValueError(f"unknown window {text!r}: use one of {sorted(NAMED_WINDOWS)} or CENTER/WIDTH")
    if not windows:
        raise ValueError(f"no windows in {spec!r}")
    return tuple(windows)


def format_windows(windows: Iterable[Window]) -> str:
    """The inverse of parse_windows: preset names where they match, CENTER/WIDTH otherwise."""
    names = {w: name for name, w in NAMED_WINDOWS.items()}
    return ",".join(names.get(w, f"{_number(w.center)}/{_number(w.width)}") for w in windows)


def _number(value: float) -> str:
    """Shortest text that parses back to `value` ("40", not "40.0"; never rounded like :g)."""
    text = f"{value:g}"
    return text if float(text) == value else repr(float(value))


_buffers = threading.local()
SCRATCH_SHAPES = 4  # scratch arrays kept per thread: a few shapes cover a data set; a client can't grow it


def _float_buffer(shape: tuple[int, int]) -> np.ndarray:
    """A reused float32 scratch array per thread and shape, the SCRATCH_SHAPES most recent shapes kept:
    fresh 1 MiB arrays cost page faults."""
    cache = getattr(_buffers, "cache", None)
    if cache is None:
        cache = _buffers.cache = {}
    buf = cache.pop(shape, None)  # re-inserted below: the dict's order is the order of last use
    if buf is None:
        buf = np.empty(shape, np.float32)
        while len(cache) >= SCRATCH_SHAPES:
            cache.pop(next(iter(cache)))
    cache[shape] = buf
    return buf


def resize_square(
    pixels: np.ndarray, size: int, slope: float = 1.0, intercept: float = 0.0, fill: float = AIR_HU
) -> np.ndarray:
    """Area-resize `pixels * slope + intercept` into a (size, size) float32 HU image.

    The longer side becomes `size`; the shorter side keeps the aspect ratio and is
    padded with `fill` (air) on both sides. Resizing before the (linear) rescale
    is exact and touches 4x fewer pixels at 512 -> 256.
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {pixels.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = pixels.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if pixels.dtype == np.float32:
        src = pixels
    else:
        src = _float_buffer((h, w))
        np.copyto(src, pixels, casting="unsafe")
    small = src if (nh, nw) == (h, w) else cv2.resize(src, (nw, nh), interpolation=cv2.INTER_AREA)
    if small is src:  # never hand out the caller's array or the reused scratch buffer
        small = small.copy()
    if slope != 1.0:
        small *= np.float32(slope)
    if intercept != 0.0:
        small += np.float32(intercept)
    if (nh, nw) == (size, size):
        return small
    out = np.full((size, size), fill, np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out


def apply_windows(hu: np.ndarray, windows: Iterable[Window] = DEFAULT_WINDOWS, dtype=np.uint8) -> np.ndarray:
    """(H, W) HU -> (C, H, W): each window clipped and scaled to [0, 1] (float32) or 0..255 (uint8)."""
    windows = tuple(windows)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
        raise ValueError(f"dtype must be uint8 or float32, got {dtype}")
    hu = np.ascontiguousarray(hu, dtype=np.float32)
    top = 255.0 if dtype == np.uint8 else 1.0
    out = np.empty((len(windows), *hu.shape), dtype)
    for channel, window in zip(out, windows):
        # One fused pass: (hu - low) * top / width, rounded and saturated to 0..255 for uint8.
        gain = top / window.width
        cv2.addWeighted(hu, gain, hu, 0.0, -window.low * gain, dst=channel, dtype=cv2.CV_8U if top == 255.0 else cv2.CV_32F)
    if dtype == np.float32:
        np.clip(out, 0.0, 1.0, out=out)
    return out


def window_stack(
    hu: np.ndarray, windows: Iterable[Window] = DEFAULT_WINDOWS, size: int = 256, dtype=np.uint8
) -> np.ndarray:
    """HU (H, W) -> (C, size, size): area-resize (aspect kept, air padding), then clip and scale each window."""
    return apply_windows(resize_square(hu, size), windows, dtype)


def window_pixels(
    pixels: np.ndarray,
    slope: float,
    intercept: float,
    windows: Iterable[Window] = DEFAULT_WINDOWS,
    size: int = 256,
    dtype=np.uint8,
) -> np.ndarray:
    """Stored pixels + modality transform -> (C, size, size); equal to window_stack of the HU."""
    return apply_windows(resize_square(pixels, size, slope, intercept), windows, dtype)
