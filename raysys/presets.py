"""Train/eval recipes: DICOM -> windows -> resize -> tensor layout, read from the model's input contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raysys.dicom import DEFAULT_LIMITS, DecodeLimits, DicomMeta, decode
from raysys.windowing import Window, parse_windows, window_pixels


def dicom_to_image(
    source: bytes | str | Path, windows: str | tuple[Window, ...], size: int, name: str | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, DicomMeta]:
    """One DICOM -> ((C, size, size) uint8 windows, meta): the exact preprocessing of training and serving."""
    dslice = decode(source, name, limits=limits)
    return window_pixels(dslice.pixels, dslice.slope, dslice.intercept, parse_windows(windows), size), dslice.meta


def to_model_input(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(B, C, S, S) uint8 -> float32 in [0, 1], normalised per channel by the model's contract."""
    x = images.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)
