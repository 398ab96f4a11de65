"""raysys.dicom on hostile bytes: every failure is a DicomDecodeError, and memory follows the limits, not the header.

Fixtures are written by pydicom here; hostile edits rewrite single elements of those files with a small
encoder written from PS3.5 7.1 (element = tag, [VR], length, value), independent of raysys.dicom.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from raysys.dicom import DEFAULT_LIMITS, DecodeLimits, DicomDecodeError, UnsupportedImageError, decode, read_dicom
from raysys.testing import hostile_bodies

REPO = Path(__file__).resolve().parents[1]
EXPLICIT = uid.ExplicitVRLittleEndian
IMPLICIT = uid.ImplicitVRLittleEndian
DEFLATED = uid.DeflatedExplicitVRLittleEndian
SYNTAXES = [EXPLICIT, IMPLICIT, DEFLATED]
IMAGE_ID = "ID_f0220bad5"
LABEL = "hostile.dcm"
SHAPE = (64, 64)
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UR", "UT", "UN", "SV", "UV"}

# Tags of the elements the hostile edits rewrite.
NUMBER_OF_FRAMES = 0x00280008
ROWS = 0x00280010
SAMPLES_PER_PIXEL = 0x00280002
BITS_ALLOCATED = 0x00280100
BITS_STORED = 0x00280101
PIXEL_REPRESENTATION = 0x00280103
RESCALE_INTERCEPT = 0x00281052
RESCALE_SLOPE = 0x00281053
IMAGE_POSITION = 0x00200032
PIXEL_SPACING = 0x00280030
WINDOW_CENTER = 0x00281050


# --- fixtures written by pydicom ----------------------------------------------------------------


def stored_pixels(signed: bool, bits_stored: int, seed: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    return np.random.default_rng(seed).integers(lo, hi + 1, size=shape, dtype=np.int64)


def ct_dataset(
    stored: np.ndarray,
    *,
    syntax: str = EXPLICIT,
    signed: bool = False,
    bits_allocated: int = 16,
    bits_stored: int = 12,
    slope: str = "1",
    intercept: str = "-1024",
    pixel_bytes: bytes | None = None,
) -> Dataset:
    """A small CT slice; `stored` holds the stored values, written in the dtype the header declares."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about `ID_...` UIDs, as RSNA uses them
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = IMAGE_ID
        meta.TransferSyntaxUID = syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = uid.CTImageStorage
        ds.SOPInstanceUID = IMAGE_ID
        ds.Modality = "CT"
        ds.PatientID = "ID_0000beef"
        ds.StudyInstanceUID = "ID_5717d1e5"
        ds.SeriesInstanceUID = "ID_5e41e5"
        ds.ImagePositionPatient = "-125\\-125\\42.5"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape
        ds.PixelSpacing = "0.48828125\\0.48828125"
        ds.BitsAllocated = bits_allocated
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = int(signed)
        ds.WindowCenter, ds.WindowWidth = "40", "80"
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
        ds.PixelData = stored.astype(dtype).tobytes() if pixel_bytes is None else pixel_bytes
        ds["PixelData"].VR = "OB" if bits_allocated == 8 or pixel_bytes is not None else "OW"
    return ds


def file_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def meta_end(data: bytes) -> int:
    """Offset of the dataset: 128-byte preamble, "DICM", then (0002,0000) UL holding the group's length."""
    assert data[128:132] == b"DICM" and data[132:138] == b"\x02\x00\x00\x00UL"
    return 144 + struct.unpack_from("<I", data, 140)[0]


# (syntax, signed, bits stored, slope, intercept, seed): one small CT per syntax, with different transforms.
FIXTURES = {
    "explicit": (EXPLICIT, False, 12, "1", "-1024", 1),
    "implicit": (IMPLICIT, True, 16, "2", "-1024", 2),
    "deflated": (DEFLATED, False, 12, "0.5", "-1000", 3),
}


@functools.cache
def fixture(name: str) -> tuple[bytes, np.ndarray, float, float]:
    """(file bytes, stored pixels, slope, intercept) of one FIXTURES entry."""
    syntax, signed, bits_stored, slope, intercept, seed = FIXTURES[name]
    stored = stored_pixels(signed, bits_stored, seed)
    ds = ct_dataset(stored, syntax=syntax, signed=signed, bits_stored=bits_stored, slope=slope, intercept=intercept)
    return file_bytes(ds), stored, float(slope), float(intercept)


def assert_refused(data: bytes, *needles: str, kind: type[DicomDecodeError] = DicomDecodeError, **kwargs) -> str:
    with pytest.raises(kind) as info:
        decode(data, LABEL, **kwargs)
    message = str(info.value)
    for needle in (LABEL, *needles):
        assert needle in message, message
    return message


# --- a tiny element rewriter (PS3.5 7.1.2 explicit VR, 7.1.3 implicit VR) ------------------------


def encode_element(tag: int, vr: str, value: bytes, explicit: bool) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def top_level_elements(dataset: bytes, explicit: bool) -> list[tuple[int, int, int]]:
    """(tag, start, end) of each element of a dataset with defined lengths only (our fixtures have no sequences)."""
    out, pos = [], 0
    while pos < len(dataset):
        group, element = struct.unpack_from("<HH", dataset, pos)
        if explicit and dataset[pos + 4 : pos + 6].decode() in LONG_VRS:
            length, value_at = struct.unpack_from("<I", dataset, pos + 8)[0], pos + 12
        elif explicit:
            length, value_at = struct.unpack_from("<H", dataset, pos + 6)[0], pos + 8
        else:
            length, value_at = struct.unpack_from("<I", dataset, pos + 4)[0], pos + 8
        out.append((group << 16 | element, pos, value_at + length))
        pos = value_at + length
    return out


def put_element(data: bytes, tag: int, vr: str, value: bytes) -> bytes:
    """The file with element `tag` replaced (or inserted in tag order) by `value` written with `vr`."""
    start = meta_end(data)
    syntax = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax in (EXPLICIT, IMPLICIT), "rewrite explicit files, then deflate them with deflated_copy"
    explicit = syntax == EXPLICIT
    dataset = data[start:]
    new = encode_element(tag, vr, value, explicit)
    for element_tag, begin, end in top_level_elements(dataset, explicit):
        if element_tag == tag:
            return data[:start] + dataset[:begin] + new + dataset[end:]
        if element_tag > tag:
            return data[:start] + dataset[:begin] + new + dataset[begin:]
    raise AssertionError(f"no place for tag {tag:08X}")


def deflated_copy(explicit_file: bytes) -> bytes:
    """The same dataset as a Deflated Explicit VR Little Endian file (PS3.5 A.5: raw deflate after the meta group).

    The meta group is the one pydicom writes for the deflated fixture (same SOP instance); the dataset
    may be damaged, pydicom never parses it here.
    """
    meta = fixture("deflated")[0]
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    dataset = explicit_file[meta_end(explicit_file) :]
    return meta[: meta_end(meta)] + compressor.compress(dataset) + compressor.flush()


def text(value: str) -> bytes:
    """A text value padded to even length with a space, as PS3.5 6.2 pads DS/IS/CS."""
    raw = value.encode("latin-1")
    return raw + b" " * (len(raw) % 2)


def us(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}H", *values)


# --- normal files and limits --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_decodes_to_exact_hu(name):
    data, stored, slope, intercept = fixture(name)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == FIXTURES[name][0]
    hu, meta = read_dicom(data, LABEL)
    expected = stored.astype(np.float64) * slope + intercept  # slopes 0.5, 1, 2: exact in float32
    assert hu.dtype == np.float32 and hu.shape == SHAPE
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert meta.image_id == IMAGE_ID and (meta.rows, meta.columns) == SHAPE and meta.z == 42.5


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_tighter_caller_limits_refuse_a_normal_file(name):
    data, _, _, _ = fixture(name)
    assert_refused(data, "64 x 64", "max_side 32", limits=DecodeLimits(max_side=32))
    assert_refused(data, "8192 bytes", "max_bytes 4096", limits=DecodeLimits(max_bytes=4096))
    assert decode(data, LABEL, limits=DecodeLimits(max_side=64, max_bytes=64 * 64 * 2)).pixels.shape == SHAPE


def test_default_limits_admit_large_ct_slices():
    assert DEFAULT_LIMITS == DecodeLimits(max_side=4096, max_bytes=64 * 1024 * 1024)
    stored = stored_pixels(False, 12, seed=4, shape=(1024, 1024))  # the largest common CT matrix
    hu, _ = read_dicom(file_bytes(ct_dataset(stored)))
    np.testing.assert_array_equal(hu, (stored - 1024).astype(np.float32))


@pytest.mark.parametrize("field, value", [("max_side", 0), ("max_bytes", -1), ("max_side", 1.5)])
def test_limits_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=field):
        DecodeLimits(**{field: value})


def test_integral_rows_written_as_ds_text_is_accepted():
    data, stored, _, _ = fixture("explicit")
    hu, meta = read_dicom(put_element(data, ROWS, "DS", text("64")), LABEL)
    assert meta.rows == 64
    np.testing.assert_array_equal(hu, (stored - 1024).astype(np.float32))


@pytest.mark.parametrize(
    "tag, value",
    [(IMAGE_POSITION, "0\\0\\inf"), (IMAGE_POSITION, "0\\nan\\1"), (IMAGE_POSITION, "0\\0\\1e400")],
)
def test_non_finite_position_reads_as_absent(tag, value):
    data, _, _, _ = fixture("explicit")
    _, meta = read_dicom(put_element(data, tag, "DS", text(value)), LABEL)
    assert np.isnan(meta.z)


def test_non_finite_spacing_and_window_read_as_absent():
    data, _, _, _ = fixture("explicit")
    data = put_element(data, PIXEL_SPACING, "DS", text("nan\\0.5"))
    data = put_element(data, WINDOW_CENTER, "DS", text("inf"))
    _, meta = read_dicom(data, LABEL)
    assert all(np.isnan(v) for v in meta.pixel_spacing)
    assert meta.window_center is None and meta.window_width == 80.0


# --- hostile header values ----------------------------------------------------------------------

# (case id, tag, VR, value, what the message must name); each applied to explicit, implicit and deflated files.
HOSTILE = [
    ("frames-inf", NUMBER_OF_FRAMES, "IS", text("inf"), "NumberOfFrames"),
    ("frames-1e400", NUMBER_OF_FRAMES, "IS", text("1e400"), "NumberOfFrames"),
    ("frames-0", NUMBER_OF_FRAMES, "IS", text("0"), "NumberOfFrames"),
    ("frames--1", NUMBER_OF_FRAMES, "IS", text("-1"), "NumberOfFrames"),
    ("frames-abc", NUMBER_OF_FRAMES, "IS", text("abc"), "NumberOfFrames"),
    ("frames-nan", NUMBER_OF_FRAMES, "IS", text("nan"), "NumberOfFrames"),
    ("frames-two-values", NUMBER_OF_FRAMES, "IS", text("1\\1"), "NumberOfFrames"),
    ("bits-stored-0", BITS_STORED, "US", us(0), "BitsStored"),
    ("bits-stored-17", BITS_STORED, "US", us(17), "BitsStored"),
    ("rows-two-values", ROWS, "US", us(64, 64), "Rows"),
    ("rows-ds-fraction", ROWS, "DS", text("64.5"), "Rows"),
    ("samples-two-values", SAMPLES_PER_PIXEL, "US", us(1, 1), "SamplesPerPixel"),
    ("bits-allocated-0", BITS_ALLOCATED, "US", us(0), "BitsAllocated"),
    ("bits-allocated-12", BITS_ALLOCATED, "US", us(12), "BitsAllocated"),
    ("bits-allocated-64", BITS_ALLOCATED, "US", us(64), "BitsAllocated"),
    ("representation-2", PIXEL_REPRESENTATION, "US", us(2), "PixelRepresentation"),
    ("slope-nan", RESCALE_SLOPE, "DS", text("nan"), "RescaleSlope"),
    ("slope-inf", RESCALE_SLOPE, "DS", text("inf"), "RescaleSlope"),
    ("slope--inf", RESCALE_SLOPE, "DS", text("-inf"), "RescaleSlope"),
    ("slope-0", RESCALE_SLOPE, "DS", text("0"), "RescaleSlope"),
    ("slope-1e400", RESCALE_SLOPE, "DS", text("1e400"), "RescaleSlope"),
    ("slope-float32-overflow", RESCALE_SLOPE, "DS", text("1e36"), "RescaleSlope"),
    ("intercept-nan", RESCALE_INTERCEPT, "DS", text("nan"), "RescaleIntercept"),
    ("intercept-inf", RESCALE_INTERCEPT, "DS", text("inf"), "RescaleIntercept"),
    ("intercept--inf", RESCALE_INTERCEPT, "DS", text("-inf"), "RescaleIntercept"),
]
# Explicit VR only: implicit VR files carry no VR, so these bytes would read as a valid US there.
HOSTILE_EXPLICIT_VR = [
    ("rows-ob", ROWS, "OB", us(64), "Rows"),
    ("rows-ds-two-values", ROWS, "DS", text("64\\64"), "Rows"),
    ("bits-allocated-lo-text", BITS_ALLOCATED, "LO", text("sixteen"), "BitsAllocated"),
]


def hostile_file(syntax: str, tag: int, vr: str, value: bytes) -> bytes:
    data, _, _, _ = fixture("implicit" if syntax == IMPLICIT else "explicit")
    edited = put_element(data, tag, vr, value)
    return deflated_copy(edited) if syntax == DEFLATED else edited


@pytest.mark.parametrize("syntax", SYNTAXES, ids=["explicit", "implicit", "deflated"])
@pytest.mark.parametrize("case, tag, vr, value, keyword", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_header_value(syntax, case, tag, vr, value, keyword):
    assert_refused(hostile_file(syntax, tag, vr, value), keyword)


@pytest.mark.parametrize("syntax", [EXPLICIT, DEFLATED], ids=["explicit", "deflated"])
@pytest.mark.parametrize("case, tag, vr, value, keyword", HOSTILE_EXPLICIT_VR, ids=[c[0] for c in HOSTILE_EXPLICIT_VR])
def test_hostile_vr(syntax, case, tag, vr, value, keyword):
    assert_refused(hostile_file(syntax, tag, vr, value), keyword)


@pytest.mark.parametrize("syntax", SYNTAXES, ids=["explicit", "implicit", "deflated"])
def test_two_frames_stay_unsupported(syntax):
    data = hostile_file(syntax, NUMBER_OF_FRAMES, "IS", text("2"))
    assert_refused(data, "2 frames", kind=UnsupportedImageError)


@pytest.mark.parametrize("syntax", SYNTAXES, ids=["explicit", "implicit", "deflated"])
def test_wrapped_intercept_rule_never_sees_an_infinite_intercept(syntax):
    # 12-bit unsigned with intercept > -100 is the RSNA defect; inf must not be "repaired" to -1000
    assert_refused(hostile_file(syntax, RESCALE_INTERCEPT, "DS", text("inf")), "RescaleIntercept")


@pytest.mark.parametrize("syntax", SYNTAXES, ids=["explicit", "implicit", "deflated"])
@pytest.mark.parametrize("sequence", [False, True], ids=["scan", "pydicom"])
def test_encapsulated_pixels_under_uncompressed_syntax(syntax, sequence):
    stored = stored_pixels(False, 12, seed=5)
    ds = ct_dataset(stored, syntax=IMPLICIT if syntax == IMPLICIT else EXPLICIT)
    if sequence:  # an undefined-length sequence sends the file through pydicom
        ds.ReferencedImageSequence = [Dataset()]
        ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
        ds["ReferencedImageSequence"].is_undefined_length = True
    data = file_bytes(ds)
    # pydicom writes undefined-length PixelData only for compressed syntaxes: swap the last element by hand
    explicit = syntax != IMPLICIT
    element_at = len(data) - stored.size * 2 - (12 if explicit else 8)
    items = encapsulate([stored.astype("<u2").tobytes()]) + b"\xfe\xff\xdd\xe0\0\0\0\0"  # + sequence delimiter
    head = encode_element(0x7FE00010, "OB", b"", explicit)[:-4] + b"\xff\xff\xff\xff"
    data = data[:element_at] + head + items
    if syntax == DEFLATED:
        data = deflated_copy(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pydicom.dcmread(io.BytesIO(data))["PixelData"].is_undefined_length  # the fixture is what it claims
    assert_refused(data, "encapsulated", syntax)


def with_syntax_bytes(data: bytes, syntax: str) -> bytes:
    """An explicit VR LE file claiming another transfer syntax of the same length (pydicom refuses to write it)."""
    end, old = meta_end(data), EXPLICIT.encode() + b"\0"  # the UI value, padded with a NUL (PS3.5 6.2)
    assert data[:end].count(old) == 1 and len(syntax) == len(EXPLICIT)
    return data[:end].replace(old, syntax.encode() + b"\0") + data[end:]


def test_unknown_transfer_syntax():
    data = with_syntax_bytes(fixture("explicit")[0], "1.2.840.10008.1.2.9")
    assert_refused(data, "transfer syntax", "1.2.840.10008.1.2.9")


@pytest.mark.parametrize("syntax", sorted(uid.AllTransferSyntaxes))
def test_every_transfer_syntax_decodes_or_is_refused(syntax):
    stored = stored_pixels(False, 8, seed=9, shape=(16, 16))
    compressed = uid.UID(syntax).is_compressed
    junk = encapsulate([b"\xff\xd8\xff\xc0 not a codestream \xff\xd9"]) if compressed else None
    data = file_bytes(ct_dataset(stored, syntax=syntax, bits_allocated=8, bits_stored=8, pixel_bytes=junk))
    if compressed:
        assert_refused(data, syntax)
    else:  # the four uncompressed syntaxes, big endian included
        np.testing.assert_array_equal(read_dicom(data, LABEL)[0], (stored - 1024).astype(np.float32))


def test_nul_byte_in_path():
    with pytest.raises(DicomDecodeError, match="cannot read"):
        decode("bad\0name.dcm")


def test_corrupt_deflate_stream():
    data, _, _, _ = fixture("deflated")
    start = meta_end(data)
    assert_refused(data[:start] + b"\xff" * 64 + data[start + 64 :], "deflate")


# --- truncation and byte flips ------------------------------------------------------------------


def pixel_offset(data: bytes, stored: np.ndarray) -> int:
    """Where the pixel values start in an uncompressed fixture: they are its last bytes."""
    return len(data) - stored.size * 2


@pytest.mark.parametrize("name", ["explicit", "implicit"])
def test_truncation_at_every_header_offset(name):
    data, stored, _, _ = fixture(name)
    pixels_at = pixel_offset(data, stored)
    npix = stored.size * 2
    cuts = [*range(pixels_at), *(pixels_at + k for k in (0, 1, 2, npix // 2, npix - 1))]
    for cut in cuts:
        with pytest.raises(DicomDecodeError):
            decode(data[:cut], LABEL)


def test_truncation_at_every_offset_of_a_deflated_file():
    data, _, _, _ = fixture("deflated")  # the pixels are inside the deflate stream: cut everywhere
    for cut in range(len(data)):
        with pytest.raises(DicomDecodeError):
            decode(data[:cut], LABEL)


@functools.cache
def sequence_fixture() -> tuple[bytes, np.ndarray]:
    """The explicit fixture with an undefined-length sequence, which the direct scan hands to pydicom."""
    data, stored, _, _ = fixture("explicit")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.ReferencedImageSequence = [Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    ds["ReferencedImageSequence"].is_undefined_length = True
    return file_bytes(ds), stored


def test_truncation_on_the_pydicom_path():
    data, stored = sequence_fixture()
    pixels_at = pixel_offset(data, stored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about cut sequences
        for cut in [*range(meta_end(data), pixels_at), pixels_at + 1, len(data) - 1]:
            with pytest.raises(DicomDecodeError):
                decode(data[:cut], LABEL)


def flipped(data: bytes, start: int, end: int, rng: np.random.Generator) -> bytes:
    """`data` with 1 to 8 bytes in data[start:end] replaced by other random values."""
    out = bytearray(data)
    for at in rng.integers(start, end, size=rng.integers(1, 9)):
        out[at] ^= int(rng.integers(1, 256))
    return bytes(out)


def decode_or_refuse(data: bytes) -> bool:
    """True when `data` decodes (to a finite float32 image of its header's size), False on DicomDecodeError."""
    try:
        hu, meta = read_dicom(data, LABEL)
    except DicomDecodeError:
        return False
    assert hu.dtype == np.float32 and hu.shape == (meta.rows, meta.columns)
    assert np.isfinite(hu).all()
    return True


MUTANTS = 3000  # per fixture: most fail fast in the direct scan, so this takes well under a second


@pytest.mark.parametrize("name", ["explicit", "implicit"])
def test_random_header_byte_flips(name):
    data, stored, _, _ = fixture(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    end = pixel_offset(data, stored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the damage it reads around
        decoded = sum(decode_or_refuse(flipped(data, 0, end, rng)) for _ in range(MUTANTS))
    assert 0 < decoded < MUTANTS  # flips both in ignored and in vital bytes


def test_random_header_byte_flips_on_the_pydicom_path():
    data, stored = sequence_fixture()
    rng = np.random.default_rng(7)
    start, end = meta_end(data), pixel_offset(data, stored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = sum(decode_or_refuse(flipped(data, start, end, rng)) for _ in range(MUTANTS // 3))  # ~1 ms each
    assert 0 < decoded < MUTANTS // 3


def test_random_byte_flips_in_a_deflated_file():
    data, stored, _, _ = fixture("deflated")
    explicit = put_element(fixture("explicit")[0], RESCALE_SLOPE, "DS", text("0.5"))  # same dataset, not deflated
    rng = np.random.default_rng(99)
    start, end = meta_end(explicit), pixel_offset(explicit, stored)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # flips in the dataset's header, then deflated: they reach the scan of inflated bytes
        decoded = sum(decode_or_refuse(deflated_copy(flipped(explicit, start, end, rng))) for _ in range(MUTANTS // 2))
        # flips anywhere in the file as stored: meta group, or (mostly) a corrupt deflate stream
        decoded += sum(decode_or_refuse(flipped(data, 0, len(data), rng)) for _ in range(MUTANTS // 2))
    assert decoded > 0


# --- compressed pixel data: the codestream must agree with the header -----------------------------


def jpeg_codestream(shape: tuple[int, int] = SHAPE, fmt: str = "JPEG") -> bytes:
    """A real 8-bit greyscale JPEG (or raw JPEG 2000 codestream) written by Pillow."""
    pixels = np.random.default_rng(6).integers(0, 256, size=shape, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"no_jp2": True} if fmt == "JPEG2000" else {}))
    return out.getvalue()


def with_sof_size(jpeg: bytes, rows: int, cols: int) -> bytes:
    """The JPEG with its baseline SOF0 (FFC0: length, precision, height, width) claiming rows x cols."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", rows, cols) + jpeg[at + 9 :]


def with_siz_size(j2k: bytes, rows: int, cols: int) -> bytes:
    """The J2K codestream with SIZ (FF51 after SOC FF4F: Lsiz, Rsiz, Xsiz, Ysiz) claiming rows x cols."""
    assert j2k[:4] == b"\xff\x4f\xff\x51"
    return j2k[:8] + struct.pack(">II", cols, rows) + j2k[16:]


def encapsulated_file(codestream: bytes, syntax: str, rows: int = SHAPE[0], cols: int = SHAPE[1]) -> bytes:
    stored = np.zeros(SHAPE, dtype=np.int64)
    ds = ct_dataset(stored, syntax=syntax, bits_allocated=8, bits_stored=8, pixel_bytes=encapsulate([codestream]))
    ds.Rows, ds.Columns = rows, cols
    return file_bytes(ds)


def test_real_jpeg_file_decodes():
    data = encapsulated_file(jpeg_codestream(), uid.JPEGBaseline8Bit)
    hu, meta = read_dicom(data, LABEL)
    assert hu.shape == SHAPE and (meta.rows, meta.columns) == SHAPE


@pytest.mark.parametrize("rows, cols", [(128, 128), (64, 65), (0, 64)])
def test_jpeg_codestream_size_must_match_the_header(rows, cols):
    data = encapsulated_file(with_sof_size(jpeg_codestream(), rows, cols), uid.JPEGBaseline8Bit)
    assert_refused(data, "codestream", f"{rows} x {cols}", "64 x 64")


def test_jpeg2000_codestream_size_must_match_the_header():
    data = encapsulated_file(with_siz_size(jpeg_codestream(fmt="JPEG2000"), 128, 128), uid.JPEG2000Lossless)
    assert_refused(data, "codestream", "128 x 128", "64 x 64")


def test_colour_jpeg_codestream_is_unsupported():
    rgb = Image.fromarray(np.random.default_rng(7).integers(0, 256, size=(*SHAPE, 3), dtype=np.uint8))
    out = io.BytesIO()
    rgb.save(out, format="JPEG")
    assert_refused(encapsulated_file(out.getvalue(), uid.JPEGBaseline8Bit), "3 components", kind=UnsupportedImageError)


def test_jpeg_without_frame_header():
    jpeg = jpeg_codestream()
    at = jpeg.index(b"\xff\xc0")
    no_sof = jpeg[:at] + jpeg[at + 2 + struct.unpack_from(">H", jpeg, at + 2)[0] :]  # drop the whole SOF0 segment
    assert_refused(encapsulated_file(no_sof, uid.JPEGBaseline8Bit), "SOF")


def test_compressed_syntax_with_plain_pixel_data():
    assert_refused(with_syntax_bytes(fixture("explicit")[0], uid.RLELossless), "not encapsulated")


# --- bombs, decoded under an address-space cap in a subprocess ----------------------------------

BOMB_RUNNER = r"""
import json, resource, sys
import numpy as np
import raysys.dicom as dicom

def vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

_, hard = resource.getrlimit(resource.RLIMIT_AS)
cap = vm_size() + 384 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))

def report(case, kind, message):
    print(json.dumps({"case": case, "type": kind, "message": message}), flush=True)

try:
    block = np.ones(2**30, dtype=np.uint8)  # the control: 1 GiB must not fit under the cap
    report("control", "allocated", str(block.nbytes))
    del block
except MemoryError as e:
    report("control", "MemoryError", str(e))
for path in sys.argv[1:]:
    try:
        dslice = dicom.decode(path)
        report(path, "decoded", str(dslice.pixels.shape))
    except Exception as e:  # the test wants every type by name, MemoryError included
        report(path, type(e).__name__, str(e))
"""


def inflated_size(stream: bytes) -> int:
    """Bytes a raw deflate stream inflates to, counted 16 MiB at a time."""
    inflater, total, pending = zlib.decompressobj(-zlib.MAX_WBITS), 0, stream
    while pending:
        total += len(inflater.decompress(pending, 2**24))
        pending = inflater.unconsumed_tail
    assert inflater.eof
    return total


def rle_claiming(rows: int, cols: int) -> bytes:
    """A real 8x8 RLE Lossless CT whose header then claims rows x cols."""
    stored = stored_pixels(False, 12, seed=8, shape=(8, 8))
    ds = ct_dataset(stored)
    ds.compress(uid.RLELossless, stored.astype(np.uint16), generate_instance_uid=False)
    ds.Rows, ds.Columns = rows, cols
    return file_bytes(ds)


def run_capped(paths: list[Path]) -> dict[str, dict]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", BOMB_RUNNER, *map(str, paths)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"capped decoder died (rc {done.returncode}): {done.stderr[-3000:]}"
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in results}


def test_bombs_are_refused_from_their_header_under_a_memory_cap(tmp_path):
    bomb = hostile_bodies(fixture("explicit")[0])["deflate_bomb"]  # 600 MiB of zeros before the pixels
    assert len(bomb) < 1_000_000  # under a megabyte on disk...
    assert inflated_size(bomb[meta_end(bomb) :]) >= 512 * 2**20  # ...over 512 MiB inflated

    jpeg = jpeg_codestream()
    j2k = jpeg_codestream(fmt="JPEG2000")
    bombs = {
        "deflate.dcm": (bomb, "inflates past"),
        "rle-16384.dcm": (rle_claiming(16384, 16384), "max_side 4096"),
        "rle-65535.dcm": (rle_claiming(65535, 65535), "max_side 4096"),
        "jpeg-header-65535.dcm": (encapsulated_file(jpeg, uid.JPEGBaseline8Bit, 65535, 65535), "max_side 4096"),
        "jpeg-sof-65535.dcm": (encapsulated_file(with_sof_size(jpeg, 65535, 65535), uid.JPEGBaseline8Bit), "max_side 4096"),
        "j2k-siz-60000.dcm": (encapsulated_file(with_siz_size(j2k, 60000, 60000), uid.JPEG2000Lossless), "max_side 4096"),
    }
    controls = {  # the same kinds of file, honest: they must still decode under the cap
        "deflate-ok.dcm": fixture("deflated")[0],
        "rle-ok.dcm": rle_claiming(8, 8),
        "jpeg-ok.dcm": encapsulated_file(jpeg, uid.JPEGBaseline8Bit),
        "j2k-ok.dcm": encapsulated_file(j2k, uid.JPEG2000Lossless),
    }
    paths = []
    for name, data in [*((n, d) for n, (d, _) in bombs.items()), *controls.items()]:
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    results = run_capped(paths)

    assert results["control"]["type"] == "MemoryError", "the address-space cap does not stop a 1 GiB allocation"
    for name, (_, needle) in bombs.items():
        result = results[str(tmp_path / name)]
        assert result["type"] == "DicomDecodeError", (name, result)
        assert "limit" in result["message"] and needle in result["message"], (name, result)
        assert name in result["message"], (name, result)
    for name in controls:
        assert results[str(tmp_path / name)]["type"] == "decoded", (name, results[str(tmp_path / name)])


def _rle_with_segments(stored: np.ndarray, segments: list[bytes]) -> bytes:
    """A 16-bit RLE Lossless CT of stored's shape whose one frame holds these PackBits segments."""
    ds = ct_dataset(stored)
    ds.compress(uid.RLELossless, stored.astype(np.uint16), generate_instance_uid=False)
    offsets = [64 + sum(len(s) for s in segments[:i]) for i in range(len(segments))]
    header = struct.pack("<16I", len(segments), *offsets, *[0] * (15 - len(segments)))
    ds.PixelData = encapsulate([header + b"".join(segments)])
    return file_bytes(ds)


def test_rle_segments_that_expand_past_their_image_are_refused_before_decoding():
    stored = stored_pixels(False, 12, seed=9, shape=(64, 64))
    # Independent PackBits encoding: each segment as literal runs of up to 128 bytes (header n - 1).
    planes = [(stored >> 8).astype(np.uint8).tobytes(), (stored & 0xFF).astype(np.uint8).tobytes()]
    literal = [b"".join(bytes([len(p[i:i + 128]) - 1]) + p[i:i + 128] for i in range(0, len(p), 128)) for p in planes]
    good = _rle_with_segments(stored, literal)
    assert np.array_equal(decode(good).pixels, stored)  # the hand-made frame is a real image

    # 200 KB of two-byte runs that each repeat a byte 128 times: 12.8 MB for an image that needs 4 KB per segment.
    flood = b"\x81\x00" * 100_000
    assert_refused(_rle_with_segments(stored, [flood, literal[1]]), "RLE Lossless (1.2.840.10008.1.2.5) segment 1 decodes past")
    assert_refused(_rle_with_segments(stored, literal[:1]), "1 segments, 16-bit samples need 2")
    ds = pydicom.dcmread(io.BytesIO(good))
    frame = bytearray(pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1))
    frame[8:12] = struct.pack("<I", len(frame) + 1000)  # the second segment starts past the frame's end
    ds.PixelData = encapsulate([bytes(frame)])
    assert_refused(file_bytes(ds), "segment 1 lies outside its frame")


def test_random_byte_flips_in_an_rle_file():
    """Flips anywhere in a small RLE file: header, fragment table, segment offsets, runs (found an IndexError once)."""
    data = rle_claiming(8, 8)
    rng = np.random.default_rng(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = sum(decode_or_refuse(flipped(data, 0, len(data), rng)) for _ in range(MUTANTS))
    assert 0 < decoded < MUTANTS
