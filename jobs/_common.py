"""Shared by the job entrypoints: make `raysys` importable from a `--working-dir .` upload, smoke data."""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the uploaded working dir holds the package; no install needed on the head


def smoke_data() -> tuple[str, str]:
    """A tiny phantom dataset in a temp folder on the node running the job: (dicoms, labels.csv)."""
    from raysys.testing import small_phantom

    out = Path(tempfile.mkdtemp(prefix="raysys-smoke-"))
    small_phantom(out)
    return str(out / "dicoms"), str(out / "labels.csv")


def without(argv: list[str], flag: str) -> tuple[list[str], bool]:
    return [a for a in argv if a != flag], flag in argv
