"""raysys.storage: one filesystem layer for local paths and URIs (checked here through file:// URIs)."""

import json
import math
import os

import pytest

from raysys import storage
from raysys.labels import LABELS, read_labels
from raysys.testing import strict_json


def test_resolve_makes_local_paths_absolute_and_leaves_uris_and_empty_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("a/b.csv") == os.path.join(str(tmp_path), "a", "b.csv")
    assert storage.resolve("s3://bucket/key") == "s3://bucket/key"
    assert storage.resolve("") == ""
    assert storage.join("gs://b/runs", "x", "y.csv") == "gs://b/runs/x/y.csv"
    assert storage.with_scheme("bucket/runs/ck", "s3://bucket/runs") == "s3://bucket/runs/ck"
    assert storage.with_scheme("/local/ck", "/local") == "/local/ck"
    assert storage.with_scheme("/local/ck", "file:///local") == "file:///local/ck"


def test_read_write_copy_and_download_through_uris(tmp_path):
    root = f"file://{tmp_path}"
    storage.write_text(f"{root}/run/sub/a.txt", "hello")
    assert (tmp_path / "run" / "sub" / "a.txt").read_text() == "hello"  # parent folders made
    assert storage.read_text(f"{root}/run/sub/a.txt") == "hello"
    assert storage.is_file(f"{root}/run/sub/a.txt") and storage.is_dir(f"{root}/run")
    assert not storage.exists(f"{root}/run/missing")
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        storage.read_bytes(f"{root}/missing.txt")
    for folder in (f"{root}/run", str(tmp_path / "run")):
        with pytest.raises(IsADirectoryError, match="run: is a folder, expected a file"):
            storage.read_bytes(folder)
    storage.copy_tree(f"{root}/run", f"{root}/copy")
    assert (tmp_path / "copy" / "sub" / "a.txt").read_text() == "hello"
    local = storage.local_dir(f"{root}/copy")
    assert (local / "sub" / "a.txt").read_text() == "hello" and local != tmp_path / "copy"
    assert storage.local_dir(f"{root}/copy") == local  # downloaded once
    # A folder replaced under the same URI (a sweep exporting best/ again) is downloaded again, never served stale.
    storage.write_text(f"{root}/run/sub/a.txt", "hello again")
    storage.copy_tree(f"{root}/run", f"{root}/copy")
    assert (storage.local_dir(f"{root}/copy") / "sub" / "a.txt").read_text() == "hello again"
    with pytest.raises(FileNotFoundError, match="nothing-here: no such folder"):
        storage.local_dir(f"{root}/nothing-here")
    assert storage.tree_size(str(tmp_path / "copy")) == len("hello again")


def test_file_uri_listings_read_back_whatever_the_names_hold(tmp_path):
    """A listing of file:///folder names files file:///folder/...; a URI's path is taken as written (a space, "#",
    "?" and "%20" are part of the name, as in Ray Data's readers), and file:// with a host is refused."""
    names = ["a.dcm", "b c#1?x=2.dcm", "d%20e.dcm", "sub/F.DCM"]
    for k, name in enumerate(names):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(bytes([k]) * (k + 1))
    listed = storage.list_files(f"file://{tmp_path}", ".dcm")
    assert listed == {f"file://{tmp_path}/{name}": k + 1 for k, name in enumerate(names)}
    for k, name in enumerate(names):
        assert storage.read_bytes(f"file://{tmp_path}/{name}") == bytes([k]) * (k + 1)
    assert storage.folder_files(f"file://{tmp_path}/") == sorted(names)
    with pytest.raises(ValueError, match="file:// URI takes an absolute path"):
        storage.read_bytes(f"file://{str(tmp_path).lstrip('/')}/a.dcm")


def test_downloads_of_replaced_versions_are_removed_once_unused(tmp_path):
    """A Serve node reloading a checkpoint exported again under one URI keeps one download, not one per version."""
    root = f"file://{tmp_path}"

    def export(text: str, name: str = "best") -> None:
        storage.write_text(f"{root}/src/weights.txt", text)
        storage.copy_tree(f"{root}/src", f"{root}/{name}")

    def age(download) -> None:  # no process has asked for it for longer than the grace period
        old = os.path.getmtime(download / storage.COMPLETE) - 2 * storage.STALE_DOWNLOAD_S
        os.utime(download / storage.COMPLETE, (old, old))

    export("v1")
    first = storage.local_dir(f"{root}/best")
    export("other", name="other")
    other = storage.local_dir(f"{root}/other")
    age(other)
    export("v2")
    second = storage.local_dir(f"{root}/best")
    assert second != first and (second / "weights.txt").read_text() == "v2"
    assert (first / "weights.txt").read_text() == "v1"  # asked for moments ago: a replica may still be loading it
    age(first)
    assert storage.local_dir(f"{root}/best") == second
    assert not first.exists()  # an unused earlier version of the same URI: removed
    assert (other / "weights.txt").read_text() == "other"  # another URI's download is not this URI's to remove
    assert (second / "weights.txt").read_text() == "v2"


def test_labels_are_read_through_the_same_layer(tmp_path):
    rows = ["ID,Label"] + [f"ID_a_{name},{int(name in ('subdural', 'any'))}" for name in LABELS]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    table = read_labels(f"file://{tmp_path}/labels.csv")
    assert table.loc["ID_a", "subdural"] == 1 and table.loc["ID_a", "epidural"] == 0
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_labels(f"file://{tmp_path}/nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: empty file"):
        read_labels(str(tmp_path / "empty.csv"))


def test_json_is_strict_nan_and_infinity_become_null():
    import numpy as np

    text = storage.to_json({"a": math.nan, "b": [math.inf, 1.5], "c": np.float32(2.0), "d": np.float64("nan")})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": 2.0, "d": None}
    assert "NaN" not in text and "Infinity" not in text


def test_benchmark_lines_are_strict_json(tmp_path, capsys, monkeypatch):
    """Every benchmark prints its result through _common.emit: a NaN (an empty comparison) must come out null."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("_common", None)
    from _common import emit

    out = tmp_path / "result.json"
    emit({"mean": math.nan, "rates": [math.inf, 2.5], "name": "x"}, out)
    printed = capsys.readouterr().out.strip()
    assert printed == out.read_text().strip()
    assert "\n" not in printed  # one line
    assert strict_json(printed) == {"mean": None, "rates": [None, 2.5], "name": "x"}
