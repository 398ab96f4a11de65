"""Shared by the job entrypoints: make `raysys` importable from a `--working-dir .` upload, smoke data."""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the uploaded working dir holds the package; no install needed on the head

SMOKE_DATA = "smoke-data"  # under the job's --storage-path


def smoke_data(argv: list[str]) -> tuple[str, str]:
    """A tiny phantom dataset under the job's --storage-path: (dicoms, labels.csv).

    The storage path is where every node reads and writes the run (a shared folder or a bucket on a cluster), so
    decode tasks on any node find the files; a folder on the driver's node alone would be read by its tasks only.
    """
    from raysys import storage
    from raysys.config import TrainConfig
    from raysys.testing import small_phantom

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--storage-path", default=TrainConfig().storage_path)
    out = storage.join(storage.resolve(parser.parse_known_args(argv)[0].storage_path), SMOKE_DATA)
    with tempfile.TemporaryDirectory(prefix="raysys-smoke-") as tmp:
        small_phantom(tmp)
        storage.copy_tree(tmp, out)
    return storage.join(out, "dicoms"), storage.join(out, "labels.csv")


def smoke_name() -> str:
    """A new run name per smoke job: a name that exists resumes that run, and a finished one trains nothing."""
    return time.strftime("smoke-%Y%m%d-%H%M%S", time.gmtime())


def without(argv: list[str], flag: str) -> tuple[list[str], bool]:
    return [a for a in argv if a != flag], flag in argv
