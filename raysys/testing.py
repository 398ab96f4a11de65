"""Helpers for tests, benchmarks, smoke jobs and the demo, kept off every request path: free ports, small datasets."""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from raysys.synthetic import DENSE_PREVALENCE, PhantomConfig, write_dataset

# How closely probabilities computed in two processes (a Serve replica or a Ray Data actor, and the test itself)
# must agree. Both run the same code on the same input, but with other thread counts and batches the float32 sums
# run in another order: 1e-5 on a network whose logits stay within a few units. One whose BatchNorm statistics
# were left a few updates from their start (logits of +-1,500) differed by 4e-4 on CI's machine; tests recompute
# those statistics. An input built differently (window, size, neighbours) moves a probability by 1e-2 or more.
PROCESS_ATOL = 1e-4


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity tokens, as parsers other than Python's do."""

    def reject(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a local Serve proxy or Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    """Wait until a Serve app at `url` (http://127.0.0.1:PORT) answers GET /healthz with 200."""
    import time

    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s")


def small_phantom(out: str | Path, *, studies: int = 10, size: int = 96, seed: int = 0) -> pd.DataFrame:
    """A few phantom studies of 4-5 slices with dense bleeds: enough positives on both sides of a split.

    Writes `out/dicoms/*.dcm` and `out/labels.csv`; returns the per-slice frame.
    """
    return write_dataset(out, PhantomConfig(studies=studies, slices_per_study=(4, 5), size=size, seed=seed,
                                            prevalence=DENSE_PREVALENCE))


def hostile_bodies(good: bytes, *, seed: int = 0) -> dict[str, bytes]:
    """Bodies a public endpoint must refuse with a 4xx and no harm, made from one good explicit-VR CT slice.

    truncated      the file cut inside its header (a partly copied file)
    garbage        random bytes
    rle_bomb       RLE Lossless pixels of 8 x 8 under a header claiming 16384 x 16384 (512 MiB decoded)
    deflate_bomb   a deflated file under 1 MB holding 600 MiB of zeros before its pixels
    no_pixels      2 MiB of 10-byte private elements and no pixel data: costly to parse, then refused
    """
    import pydicom
    from pydicom.filewriter import write_file_meta_info

    def file_bytes(ds: pydicom.Dataset) -> bytes:
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    ds = pydicom.dcmread(io.BytesIO(good))
    corner = np.ascontiguousarray(ds.pixel_array[:8, :8])
    ds.Rows, ds.Columns, ds.PixelData = 8, 8, corner.tobytes()
    ds.compress(pydicom.uid.RLELossless, corner, generate_instance_uid=False)
    ds.Rows = ds.Columns = 16384
    rle_bomb = file_bytes(ds)

    ds = pydicom.dcmread(io.BytesIO(good))
    meta_end = 144 + struct.unpack_from("<I", good, 140)[0]  # (0002,0000) holds the meta group's length
    dataset, pixels = good[meta_end:], good[meta_end:].rfind(b"\xe0\x7f\x10\x00OW")  # (7FE0,0010) PixelData
    if pixels < 0:
        raise ValueError("hostile_bodies needs an explicit VR little endian slice with OW pixel data (a phantom's)")
    padding = 600 * 2**20
    creator = struct.pack("<HH2sH", 0x0029, 0x0010, b"LO", 6) + b"RAYSYS"
    blob = struct.pack("<HH2sxxI", 0x0029, 0x1010, b"OB", padding)
    # One 1 MiB block of zeros ended by a full flush refers to nothing before it: its output repeats as is.
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflate.compress(dataset[:pixels] + creator + blob) + deflate.flush(zlib.Z_FULL_FLUSH)
    mib = deflate.compress(bytes(2**20)) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(dataset[pixels:]) + deflate.flush()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    meta = io.BytesIO()
    write_file_meta_info(pydicom.filebase.DicomFileLike(meta), ds.file_meta)
    deflate_bomb = good[:132] + meta.getvalue() + head + mib * (padding // 2**20) + tail

    element = struct.pack("<HH2sH", 0x0009, 0x1010, b"LO", 2) + b"ab"
    return {"truncated": good[:300], "garbage": np.random.default_rng(seed).bytes(64 * 1024),
            "rle_bomb": rle_bomb, "deflate_bomb": deflate_bomb,
            "no_pixels": good[:pixels + meta_end] + element * (2 * 2**20 // len(element))}


def settle_batchnorm(model, images: np.ndarray):
    """`model` in eval mode with every BatchNorm's running statistics those of `images` (uint8 (B, C, S, S)).

    An untrained InceptionV3's eval-mode logits reach ~1e9, and one trained for a handful of steps keeps statistics
    near their initial values (logits of +-1,500): every probability is then 0 or 1 whatever the input, so a test
    comparing probabilities could not tell a wrongly built input, and float32 sums in another order move the few
    that are not. After one train-mode pass over `images` the logits are a few units, as a trained model's."""
    import torch

    from raysys.engine import infer

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the passes: here, the one pass
    infer(model.train(), images, torch.device("cpu"))  # train mode: the batch's statistics are used and kept
    return model.eval()


def untrained_cnn(paths, size: int, seed: int = 0):
    """An untrained InceptionV3 (seeded) for serving and prediction tests, its BatchNorm statistics those of the
    DICOMs at `paths` (see settle_batchnorm), which it reads with the default windows at `size`."""
    import torch

    from raysys.config import DataConfig
    from raysys.model import build_model
    from raysys.presets import dicom_to_image

    torch.manual_seed(seed)
    model = build_model(image_size=size)
    return settle_batchnorm(model, np.stack([dicom_to_image(str(p), DataConfig().windows, size)[0] for p in paths]))


def untrained_checkpoints(root: str | Path, paths, size: int) -> tuple[Path, Path]:
    """(CNN checkpoint, exported sequence checkpoint on that CNN) for serving tests, without training.

    The CNN is `untrained_cnn(paths, size)`. The GRU's correction is random, not zero, so the sequence stage answers
    differently from its CNN. The CNN records epoch 2 (val 0.2), the stage epoch 3 (val 0.1)."""
    import torch

    from raysys.config import Config
    from raysys.model import read_meta, save_checkpoint
    from raysys.sequence import SeriesGRU, cnn_reference, export_sequence, save_sequence

    root = Path(root)
    cnn = untrained_cnn(paths, size)
    config = Config().replace(**{"data.image_size": size}).to_dict()
    cnn_dir = save_checkpoint(root / "cnn", cnn, config=config, epoch=2, metrics={"val_weighted_log_loss": 0.2})
    gru = SeriesGRU(2048, hidden=16)
    torch.nn.init.normal_(gru.correct.weight, std=1.0)
    torch.nn.init.normal_(gru.correct.bias, std=0.5)
    save_sequence(root / "stage", gru, cnn_meta=read_meta(cnn_dir), cnn=cnn_reference(str(cnn_dir)), config={},
                  epoch=3, metrics={"val_weighted_log_loss": 0.1})
    return Path(cnn_dir), Path(export_sequence(str(root / "stage"), str(root / "best")))
