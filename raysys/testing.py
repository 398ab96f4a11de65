"""Helpers for tests, benchmarks, smoke jobs and the demo, kept off every request path: free ports, small datasets."""

from __future__ import annotations

import socket
from pathlib import Path

import pandas as pd

from raysys.synthetic import DENSE_PREVALENCE, PhantomConfig, write_dataset


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a local Serve proxy or Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_phantom(out: str | Path, *, studies: int = 10, size: int = 96, seed: int = 0) -> pd.DataFrame:
    """A few phantom studies of 4-5 slices with dense bleeds: enough positives on both sides of a split.

    Writes `out/dicoms/*.dcm` and `out/labels.csv`; returns the per-slice frame.
    """
    return write_dataset(out, PhantomConfig(studies=studies, slices_per_study=(4, 5), size=size, seed=seed,
                                            prevalence=DENSE_PREVALENCE))
