"""One filesystem layer for every file raysys reads or writes: local paths and URIs (s3://, gs://, file://).

Local paths are made absolute once, where configuration is built (`resolve`), so nothing that
runs later (Tune trials, Train workers, Ray Data tasks, Serve replicas) depends on a working
directory. Everything else goes through pyarrow's filesystems, the same layer Ray Data and
Ray Train use, so `--labels s3://...` works wherever `--data s3://...` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def resolve(path: str | Path | None) -> str:
    """Absolute local path (with ~ expanded); URIs and "" pass through untouched."""
    if path is None or str(path) == "" or is_uri(path):
        return "" if path is None else str(path)
    return os.path.abspath(os.path.expanduser(str(path)))


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a local path or a URI."""
    base = str(base)
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def parent(path: str | Path) -> str:
    """The folder holding `path` (local, absolute, or a URI)."""
    path = resolve(path)
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(path)


def sibling(path: str | Path, name: str) -> str:
    """The file `name` in the same folder as `path`."""
    return join(parent(path), name)


def with_scheme(path: str, like: str) -> str:
    """A path as a pyarrow filesystem lists it back as a URI of `like`'s scheme: "bucket/key" for object storage,
    "/abs/path" for file:// (which keeps its leading slash: file:///abs/path)."""
    if is_uri(path) or not is_uri(like):
        return path
    scheme = like.split("://", 1)[0]
    return f"{scheme}://{path}" if scheme == "file" else f"{scheme}://{path.lstrip('/')}"


def _filesystem(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `path` and the path it takes for it.

    A URI's path is passed on as written, never parsed as a URL: an object key may hold a space, "#", "?" or "%"
    (pyarrow's from_uri of the whole URI would refuse the space, cut the key at "#" and decode "%20"). Ray Data's
    readers take paths the same way. Only the scheme and bucket (the URI's authority) pick the filesystem.
    """
    target = resolve(path)
    if not is_uri(target):
        return pafs.LocalFileSystem(), target
    scheme, rest = target.split("://", 1)
    authority, _, key = rest.partition("/")
    key = key.rstrip("/")
    if scheme == "file":
        if authority not in ("", "localhost"):
            raise ValueError(f"{path}: a file:// URI takes an absolute path (file:///folder/...), not a host "
                             f"{authority!r}")
        return pafs.LocalFileSystem(), "/" + key
    try:
        fs, base = pafs.FileSystem.from_uri(f"{scheme}://{authority}")
    except ValueError as e:  # pyarrow's ArrowInvalid: an unknown scheme
        raise ValueError(f"{path}: not a path or a supported URI ({e})") from None
    return fs, f"{base.rstrip('/')}/{key}" if key else base


def read_bytes(path: str | Path) -> bytes:
    fs, where = _filesystem(path)
    try:
        # A random-access file reads the whole object in one request; a stream reads it in small ranged GETs
        # (a 262 MB checkpoint from an S3 server on 127.0.0.1: 0.7 s against 176 s).
        with fs.open_input_file(where) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError:  # pyarrow's random-access file says "is a directory" with a plain OSError
        if fs.get_file_info(where).type == pafs.FileType.Directory:
            raise IsADirectoryError(f"{path}: is a folder, expected a file") from None
        raise


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode()


def open_bytes(path: str | Path) -> io.BytesIO:
    """The whole file as a seekable in-memory file (for pandas and yaml readers)."""
    return io.BytesIO(read_bytes(path))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole file, creating its parent folders (no partial file is left on failure for local paths)."""
    fs, where = _filesystem(path)
    fs.create_dir(posixpath.dirname(where) if is_uri(path) else os.path.dirname(where), recursive=True)
    if not is_uri(path):
        tmp = f"{where}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, where)
        return
    with fs.open_output_stream(where) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def make_dirs(path: str | Path) -> None:
    fs, where = _filesystem(path)
    fs.create_dir(where, recursive=True)


def exists(path: str | Path) -> bool:
    fs, where = _filesystem(path)
    return fs.get_file_info(where).type != pafs.FileType.NotFound


def is_file(path: str | Path) -> bool:
    fs, where = _filesystem(path)
    return fs.get_file_info(where).type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    fs, where = _filesystem(path)
    return fs.get_file_info(where).type == pafs.FileType.Directory


def list_files(path: str | Path, suffix: str) -> dict[str, int]:
    """{file: size in bytes} for every file under a folder (recursively) whose name ends with `suffix` in any case,
    sorted; URIs keep their scheme. Entries whose path below the folder starts with "." or "_" are skipped: the
    files Ray Data's readers list for the same folder and extension."""
    fs, where = _filesystem(path)
    selector = pafs.FileSelector(where, recursive=True)
    found = sorted((i.path, i.size) for i in fs.get_file_info(selector)
                   if i.type == pafs.FileType.File and i.path.lower().endswith(suffix.lower())
                   and not i.path[len(selector.base_dir):].lstrip("/").startswith((".", "_")))
    return {with_scheme(p, str(path)) if is_uri(path) else p: size for p, size in found}


def folder_files(path: str | Path) -> list[str]:
    """Every file under a folder (recursively, hidden ones included) as its path below the folder ("a/b.txt"),
    sorted; [] when there is no such folder."""
    fs, where = _filesystem(path)
    if fs.get_file_info(where).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(where, recursive=True))
    return sorted(i.path[len(where):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def tree_size(path: str | Path) -> int:
    """Bytes of all files under a folder."""
    fs, where = _filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(where, recursive=True))
    return sum(info.size for info in infos if info.type == pafs.FileType.File)


def remove_file(path: str | Path) -> None:
    fs, where = _filesystem(path)
    fs.delete_file(where)


def remove_tree(path: str | Path) -> None:
    fs, where = _filesystem(path)
    if fs.get_file_info(where).type == pafs.FileType.Directory:
        fs.delete_dir(where)


def copy_tree(source: str | Path, destination: str | Path) -> None:
    """Replace `destination` with a copy of the folder `source` (either may be local or a URI)."""
    remove_tree(destination)
    make_dirs(destination)
    _copy_files(source, destination)


def _copy_files(source: str | Path, destination: str | Path) -> None:
    """pyarrow's copy_files with Ray Train's settings for checkpoints: 64 MB chunks (with the default 1 MB one, a
    262 MB checkpoint took 41 s from an S3 server on 127.0.0.1 instead of 1.1 s), and one thread when writing to S3
    (apache/arrow#32372)."""
    src_fs, src = _filesystem(source)
    dst_fs, dst = _filesystem(destination)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs, chunk_size=64 << 20,
                    use_threads=not isinstance(dst_fs, pafs.S3FileSystem))


COMPLETE = ".complete"  # in a finished download: the URI it holds; its modification time is the download's last use
STALE_DOWNLOAD_S = 600  # a replaced version's download is removed once unused this long


def local_dir(path: str | Path) -> Path:
    """A local folder with the contents of `path`: the folder itself, or a download of a URI.

    Downloads go to a folder under the system temp dir named by the URI and its listing (every file's path, size
    and modification time), and are reused by later calls in any process on the node as long as the folder
    lists the same: a folder replaced under the same URI (a sweep's best/ exported again) is downloaded again,
    and the downloads of its earlier versions are removed once no process has asked for them in
    STALE_DOWNLOAD_S (a replica still loading one keeps it).
    """
    if not is_uri(path):
        return Path(resolve(path))
    fs, where = _filesystem(path)
    if fs.get_file_info(where).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path}: no such folder")
    listing = sorted((i.path[len(where):], i.size, i.mtime_ns) for i in fs.get_file_info(pafs.FileSelector(where, recursive=True))
                     if i.type == pafs.FileType.File)
    key = hashlib.sha256(repr((str(path), listing)).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "raysys-downloads" / key
    if not (cache / COMPLETE).is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=cache.parent))
        _copy_files(path, partial)
        (partial / COMPLETE).write_text(str(path))
        try:
            partial.rename(cache)
        except OSError:  # another process finished the same download first
            shutil.rmtree(partial, ignore_errors=True)
    with contextlib.suppress(OSError):  # another user's download: theirs to keep track of
        os.utime(cache / COMPLETE)  # in use: _prune_versions keeps it
    _prune_versions(cache, str(path))
    return cache


def _prune_versions(current: Path, uri: str) -> None:
    """Remove the downloads of other versions of `uri` that no process has asked for in STALE_DOWNLOAD_S."""
    now = time.time()
    for other in current.parent.iterdir():
        marker = other / COMPLETE
        try:
            if other != current and now - marker.stat().st_mtime > STALE_DOWNLOAD_S and marker.read_text() == uri:
                shutil.rmtree(other, ignore_errors=True)
        except OSError:  # not a finished download, or another process removed it first
            continue


def to_json(obj, indent: int | None = 2) -> str:
    """Strict JSON: NaN and infinities become null (other parsers reject Python's NaN tokens)."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def finite(obj):
    """`obj` with every non-finite float (NaN, infinities), nested in dicts, lists and tuples, as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return finite(obj.item())
    return obj
