"""DICOM bytes -> Hounsfield units (float32) + the header fields raysys uses."""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import AllTransferSyntaxes, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

# RSNA files carry `ID_...` strings in UI fields; pydicom 3 warns "Invalid value
# for VR UI" on every such file. raysys never writes these datasets back, so
# reading-time validation only costs time and floods logs: switch it off.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

CODECS_HINT = "install the optional codecs: pip install 'raysys[dicom-codecs]'"

# The RSNA wrapped-intercept defect: 12-bit unsigned storage of signed data.
_WRAP_MODULUS = 4096
_WRAP_SHIFT = 1000


class DicomDecodeError(ValueError):
    """A DICOM file that cannot become a CT image; the message names the file and why."""


class UnsupportedImageError(DicomDecodeError):
    """A readable DICOM that is not a single-frame monochrome image (multi-frame, colour, ...)."""


@dataclass(frozen=True)
class DecodeLimits:
    """Largest image decode() accepts, checked from the header before anything is inflated or allocated."""

    max_side: int = 4096  # rows, columns: admits every real CT slice (512 x 512 typical, 1024 x 1024 the largest common)
    max_bytes: int = 64 * 1024 * 1024  # stored pixel bytes: 4096 x 4096 x 32 bits; a 1024 x 1024 16-bit slice is 2 MiB

    def __post_init__(self) -> None:
        for name in ("max_side", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeLimits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = DecodeLimits()

# Room for the header elements (private tags, icons, ...) in an inflated deflated dataset, beyond its pixels.
_HEADER_ALLOWANCE = 1024 * 1024


@dataclass(frozen=True)
class DicomMeta:
    """Header fields raysys uses. PatientID is kept only for splitting; never log it."""

    image_id: str  # SOPInstanceUID, e.g. "ID_000000e27"
    modality: str  # "CT" for every file raysys is meant for; "" when absent
    patient_id: str
    study_id: str
    series_id: str
    z: float  # ImagePositionPatient[2] in mm; nan when absent or not finite
    position: float  # place along the series' axis: see slice_position; nan when the header has nothing to go by
    pixel_spacing: tuple[float, float]  # (row, column) mm; (nan, nan) when absent or not finite
    rows: int
    columns: int
    window_center: float | None  # the header's first WindowCenter, if any (None when not finite)
    window_width: float | None
    wrapped_intercept_fixed: bool  # True when the RSNA 12-bit defect was repaired


@dataclass(frozen=True)
class DicomSlice:
    """Stored pixels with their modality transform: HU = pixels * slope + intercept."""

    pixels: np.ndarray  # (rows, columns) integer, defect already repaired
    slope: float
    intercept: float
    meta: DicomMeta

    def hu(self) -> np.ndarray:
        """Full-resolution Hounsfield units, float32 (rows, columns)."""
        out = self.pixels.astype(np.float32)
        out *= np.float32(self.slope)
        out += np.float32(self.intercept)
        return out


def read_dicom(
    source: bytes | str | Path, name: str | None = None, *, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[np.ndarray, DicomMeta]:
    """Read one CT slice: (HU float32 (H, W), meta). Raises DicomDecodeError on bad input."""
    dslice = decode(source, name, limits=limits)
    return dslice.hu(), dslice.meta


def decode(source: bytes | str | Path, name: str | None = None, *, limits: DecodeLimits = DEFAULT_LIMITS) -> DicomSlice:
    """Parse and validate one single-frame monochrome DICOM; pixels stay in their stored dtype.

    `name` labels the source in error messages (defaults to the path, or "<bytes>").
    Any input bytes either give a slice or raise DicomDecodeError; images larger than
    `limits` are refused from their header, before any pixel memory is allocated.
    Uncompressed little-endian files (all of RSNA) take a direct header scan that
    reads only the tags raysys uses; deflated files are inflated here, within the
    limits, then scanned the same way; everything else goes through pydicom.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    buf = _read_source(source, label)
    syntax, start = _scan_meta(buf, label)
    header = _read_header(buf, start, syntax, label, limits)
    image_id = header.get("SOPInstanceUID", "")
    if image_id:
        label = _with_image_id(label, image_id)
    pixels, slope, intercept, fixed = _pixels(header, label, limits)
    return DicomSlice(pixels=pixels, slope=slope, intercept=intercept, meta=_meta(header, fixed))


def _read_source(source: bytes | str | Path, label: str) -> bytes:
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as f:
                return f.read()
        except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
            raise DicomDecodeError(f"{label}: cannot read file ({getattr(e, 'strerror', None) or e})") from None
    return source if isinstance(source, bytes) else bytes(source)


def _with_image_id(label: str, image_id: str) -> str:
    return image_id if label == "<bytes>" else f"{label} ({image_id})"


# --- the direct scan -------------------------------------------------------------------------

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_DEFLATED_LE = "1.2.840.10008.1.2.1.99"
_SCANNABLE = {_IMPLICIT_LE, _EXPLICIT_LE}  # datasets the direct scan reads as they are in the file
_NATIVE_LE = {_IMPLICIT_LE, _EXPLICIT_LE, _DEFLATED_LE}  # pixel data is raw little-endian samples once read
_KNOWN_SYNTAXES = frozenset(AllTransferSyntaxes)  # pydicom can at least parse datasets in these
# Encapsulated syntaxes whose first fragment starts with a codestream header we can size before decoding.
_JPEG_FAMILY = set(JPEGTransferSyntaxes) | set(JPEGLSTransferSyntaxes)
_JPEG2000_FAMILY = set(JPEG2000TransferSyntaxes)


def _le_key(tag: int) -> int:
    """A (group, element) tag as one little-endian uint32 reads from the file: element << 16 | group."""
    return (tag & 0xFFFF) << 16 | tag >> 16


# The tags raysys reads: tag -> (keyword, value kind). "US" is a little-endian uint16;
# "str" is text (UI, LO, CS, DS, IS), multi-values split on backslash later.
_WANTED_TAGS = {
    0x00080018: ("SOPInstanceUID", "str"),
    0x00080060: ("Modality", "str"),
    0x00100020: ("PatientID", "str"),
    0x0020000D: ("StudyInstanceUID", "str"),
    0x0020000E: ("SeriesInstanceUID", "str"),
    0x00200013: ("InstanceNumber", "str"),
    0x00200032: ("ImagePositionPatient", "str"),
    0x00200037: ("ImageOrientationPatient", "str"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280004: ("PhotometricInterpretation", "str"),
    0x00280008: ("NumberOfFrames", "str"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "str"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281050: ("WindowCenter", "str"),
    0x00281051: ("WindowWidth", "str"),
    0x00281052: ("RescaleIntercept", "str"),
    0x00281053: ("RescaleSlope", "str"),
}
_WANTED = {_le_key(tag): wanted for tag, wanted in _WANTED_TAGS.items()}  # keyed as the scan unpacks tags
_PIXEL_DATA_TAG = 0x7FE00010
_PIXEL_DATA = _le_key(_PIXEL_DATA_TAG)
_TRANSFER_SYNTAX_ELEMENT = 0x0010  # (0002,0010)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_unpack = struct.unpack_from


def _scan_meta(buf: bytes, label: str) -> tuple[str, int]:
    """(TransferSyntaxUID, offset of the dataset) from the file meta group (PS3.10 7.1: explicit VR LE).

    The syntax comes from here alone, so pydicom never sees a file meta group and can
    never inflate a deflated dataset on its own.
    """
    n = len(buf)
    if n < 132 or buf[128:132] != b"DICM":
        raise DicomDecodeError(f"{label}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)")
    pos, syntax = 132, None
    while pos + 8 <= n:
        group, element, vr, length = _unpack("<HH2sH", buf, pos)
        if group != 2:
            break
        start = pos + 8
        if vr in _LONG_VRS:
            if pos + 12 > n:
                raise DicomDecodeError(f"{label}: file ends inside the header of file meta element (0002,{element:04X})")
            length, start = _unpack("<I", buf, pos + 8)[0], pos + 12
        if length == _UNDEFINED:
            raise DicomDecodeError(f"{label}: file meta element (0002,{element:04X}) has undefined length")
        if start + length > n:
            raise DicomDecodeError(f"{label}: file ends inside file meta element (0002,{element:04X}) ({length} bytes declared)")
        if element == _TRANSFER_SYNTAX_ELEMENT:
            syntax = buf[start : start + length].decode("latin-1").strip(" \x00")
        pos = start + length
    if syntax is None:
        raise DicomDecodeError(f"{label}: file meta group has no TransferSyntaxUID (0002,0010)")
    if syntax not in _KNOWN_SYNTAXES:
        raise DicomDecodeError(f"{label}: unknown transfer syntax {syntax!r}")
    return syntax, pos


def _read_header(buf: bytes, start: int, syntax: str, label: str, limits: DecodeLimits) -> dict:
    """Header dict of the dataset at buf[start:]: the fields in _WANTED plus PixelData."""
    if syntax in _SCANNABLE:
        header = _scan_dataset(buf, start, syntax, label)
        if header is None:
            header = _header_from_pydicom(buf, start, syntax, label)
    elif syntax == _DEFLATED_LE:
        dataset = _inflate(buf, start, label, limits)
        header = _scan_dataset(dataset, 0, syntax, label)
        if header is None:
            header = _header_from_pydicom(dataset, 0, syntax, label)  # explicit VR LE, as inflated
    else:
        header = _header_from_pydicom(buf, start, syntax, label)
    header["TransferSyntaxUID"] = syntax
    return header


def _scan_dataset(buf: bytes, pos: int, syntax: str, label: str) -> dict | None:
    """Header fields + PixelData (as a memoryview) of a little-endian dataset starting at `pos`, or None.

    None means "let pydicom decide": an undefined-length element (a sequence) or an
    integer field that is not one US value. A file that ends early, or has no PixelData,
    or has encapsulated PixelData, is a DicomDecodeError.
    """
    n = len(buf)
    explicit = syntax != _IMPLICIT_LE  # explicit VR LE, or a deflated dataset once inflated
    header: dict = {}
    tag = length = 0
    while pos + 8 <= n:
        if explicit:
            tag, vr, length = _unpack("<I2sH", buf, pos)
            start = pos + 8
            if vr in _LONG_VRS:
                if pos + 12 > n:
                    break
                length, start = _unpack("<I", buf, pos + 8)[0], pos + 12
        else:
            tag, length = _unpack("<II", buf, pos)
            vr, start = b"US", pos + 8  # implicit VR: the dictionary says US for every "US" field we read
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA:
                raise _encapsulated_error(_named(label, header), syntax)
            return None
        if tag == _PIXEL_DATA:
            header["PixelData"] = memoryview(buf)[start : start + length]
            header["PixelDataLength"] = length  # as declared; more than the view holds when the file is cut
            return header
        pos = start + length
        wanted = _WANTED.get(tag)
        if wanted is not None:
            if pos > n:
                break
            keyword, kind = wanted
            if kind == "US":
                if length != 2 or vr != b"US":
                    return None  # several values or another VR: pydicom reads it, _one_int judges it
                header[keyword] = _unpack("<H", buf, start)[0]
            else:
                header[keyword] = buf[start:pos].decode("latin-1").strip(" \x00")
    raise _scan_end_error(_named(label, header), buf, pos, tag, length)


def _named(label: str, header: dict) -> str:
    image_id = header.get("SOPInstanceUID", "")
    return _with_image_id(label, image_id) if image_id else label


def _scan_end_error(label: str, buf: bytes, pos: int, tag: int, length: int) -> DicomDecodeError:
    """Why a scan ran out of bytes before PixelData: a cut element, a cut element header, or no PixelData."""
    n = len(buf)
    if pos > n:
        group, element = tag & 0xFFFF, tag >> 16
        return DicomDecodeError(f"{label}: file ends inside element ({group:04X},{element:04X}) ({length} bytes declared)")
    if pos < n:
        return DicomDecodeError(f"{label}: file ends inside an element header at byte {pos} (of {n})")
    return DicomDecodeError(f"{label}: no PixelData element")


def _encapsulated_error(label: str, syntax: str) -> DicomDecodeError:
    name = pydicom.uid.UID(syntax).name
    return DicomDecodeError(
        f"{label}: PixelData is encapsulated (undefined length), but transfer syntax {name} ({syntax}) is uncompressed"
    )


def _inflate(buf: bytes, start: int, label: str, limits: DecodeLimits) -> bytes:
    """The raw-deflate dataset after the file meta group, inflated to at most max_bytes + a header allowance."""
    cap = limits.max_bytes + _HEADER_ALLOWANCE
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        dataset = inflater.decompress(memoryview(buf)[start:], cap)
    except zlib.error as e:
        raise DicomDecodeError(f"{label}: corrupt deflated dataset ({e})") from None
    if not inflater.eof:
        if len(dataset) >= cap:
            raise DicomDecodeError(
                f"{label}: deflated dataset inflates past {cap} bytes "
                f"(limit: DecodeLimits.max_bytes {limits.max_bytes} + {_HEADER_ALLOWANCE} for the header)"
            )
        raise DicomDecodeError(f"{label}: deflated dataset ends early ({len(dataset)} bytes inflated, stream incomplete)")
    return dataset


# --- the pydicom path ------------------------------------------------------------------------


def _header_from_pydicom(buf: bytes, start: int, syntax: str, label: str) -> dict:
    """The same header dict as _scan_dataset, from pydicom (any syntax, any structure)."""
    uid = pydicom.uid.UID(syntax)
    fp = io.BytesIO(buf)
    fp.seek(start)
    try:
        ds = read_dataset(fp, uid.is_implicit_VR, uid.is_little_endian)
    except Exception as e:  # pydicom raises many types on damaged headers
        raise DicomDecodeError(f"{label}: unreadable DICOM header ({type(e).__name__}: {e})") from None
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid  # compressed pixels decode through pydicom's plugins, which read it here
    header: dict = {}
    for keyword, kind in _WANTED_TAGS.values():
        value = _pydicom_value(ds, keyword, kind, label)
        if value is not None:
            header[keyword] = _one_int(value, keyword, label) if kind == "US" else value
    if _PIXEL_DATA_TAG in ds:
        _pixel_data_from_pydicom(ds, header, uid, label)
    return header


def _pydicom_value(ds: pydicom.Dataset, keyword: str, kind: str, label: str) -> object:
    """The value of `keyword` (text for "str" fields, as the direct scan gives it), or None when absent or empty."""
    try:
        value = ds[keyword].value if keyword in ds else None
        if value is None or value == "" or value == b"":
            return None
        return value if kind == "US" else _text(value)
    except Exception as e:  # pydicom converts raw bytes lazily; a damaged value raises here
        raise DicomDecodeError(f"{label}: unreadable {keyword} value ({type(e).__name__}: {e})") from None


def _pixel_data_from_pydicom(ds: pydicom.Dataset, header: dict, uid: pydicom.uid.UID, label: str) -> None:
    try:
        raw = ds.get_item(_PIXEL_DATA_TAG)  # by tag: not converted, so it still carries the length the file declares
        element = ds[_PIXEL_DATA_TAG]
    except Exception as e:  # pydicom converts lazily; a damaged element raises here
        raise DicomDecodeError(f"{label}: unreadable PixelData ({type(e).__name__}: {e})") from None
    if not isinstance(element.value, bytes):
        raise DicomDecodeError(f"{_named(label, header)}: PixelData is not a byte string (VR {element.VR})")
    if element.is_undefined_length and not uid.is_encapsulated:
        raise _encapsulated_error(_named(label, header), uid)
    if uid.is_encapsulated and not element.is_undefined_length:
        raise DicomDecodeError(
            f"{_named(label, header)}: PixelData is not encapsulated, but transfer syntax {uid.name} ({uid}) is compressed"
        )
    declared = raw.length if isinstance(raw, RawDataElement) and not element.is_undefined_length else len(element.value)
    header["PixelData"] = element.value
    header["PixelDataLength"] = declared
    header["_dataset"] = ds  # compressed syntaxes decode through pydicom's plugins


def _one_int(value: object, keyword: str, label: str) -> int:
    """A single integer value, whatever VR held it (US, or DS/IS text such as "512"); else an error."""
    if isinstance(value, (MultiValue, list, tuple)):
        raise DicomDecodeError(f"{label}: {keyword} must be one integer, got {len(value)} values {list(value)!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)  # DS "512"
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise DicomDecodeError(f"{label}: {keyword} must be one integer, got {value!r}")


def _text(value: object) -> str:
    """A pydicom value as the direct scan would give it: text, multi-values joined by backslashes."""
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


# --- pixels and meta -------------------------------------------------------------------------


def _pixels(header: dict, label: str, limits: DecodeLimits) -> tuple[np.ndarray, float, float, bool]:
    if "PixelData" not in header:
        raise DicomDecodeError(f"{label}: no PixelData element")
    frames = _frame_count(header.get("NumberOfFrames"), label)
    if frames != 1:
        raise UnsupportedImageError(f"{label}: multi-frame image ({frames} frames); raysys reads single CT slices")
    rows, cols, bits_allocated, bits_stored, signed = _geometry(header, label, limits)
    slope, intercept = _rescale(header, label, bits_allocated)

    syntax = header["TransferSyntaxUID"]
    data, declared = header["PixelData"], header["PixelDataLength"]
    if len(data) < declared:
        raise DicomDecodeError(
            f"{label}: pixel data is {len(data)} bytes, its element declares {declared}: the file is cut short"
        )
    if syntax in _NATIVE_LE:
        pixels = _native_pixels(data, rows, cols, bits_allocated, bits_stored, signed, label)
    else:
        pixels = _decode_compressed(header, label, syntax, limits)
        if pixels.shape != (rows, cols):
            raise DicomDecodeError(f"{label}: decoded shape {pixels.shape}, header says {rows} x {cols}")

    fixed = False
    if bits_stored == 12 and not signed and intercept > -100:
        pixels = pixels.astype(np.int32) + _WRAP_SHIFT
        pixels[pixels >= _WRAP_MODULUS] -= _WRAP_MODULUS
        intercept = -float(_WRAP_SHIFT)
        fixed = True
    return pixels, slope, intercept, fixed


def _native_pixels(
    data: bytes | memoryview, rows: int, cols: int, bits_allocated: int, bits_stored: int, signed: bool, label: str
) -> np.ndarray:
    """(rows, cols) view of raw little-endian samples (a copy only when stray high bits must go)."""
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    expected = rows * cols * dtype.itemsize
    if len(data) < expected:
        raise DicomDecodeError(
            f"{label}: pixel data is {len(data)} bytes, expected {expected} ({rows} x {cols} x {dtype.itemsize})"
        )
    pixels = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if bits_stored < bits_allocated:
        pixels = _mask_stored_bits(pixels, bits_stored, signed)
    return pixels


def _frame_count(text: str | None, label: str) -> int:
    """NumberOfFrames (IS, absent means 1) as a positive integer."""
    if text in (None, ""):
        return 1
    try:
        value = float(text)  # IS is integer text; some writers add ".0"
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value == int(value) and value >= 1):
        raise DicomDecodeError(f"{label}: bad NumberOfFrames value {text!r} (expected a positive integer)")
    return int(value)


def _geometry(header: dict, label: str, limits: DecodeLimits) -> tuple[int, int, int, int, bool]:
    """(rows, columns, bits allocated, bits stored, signed), validated and within `limits`."""
    samples = header.get("SamplesPerPixel", 1)
    photometric = header.get("PhotometricInterpretation", "MONOCHROME2")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            f"{label}: not a monochrome image (PhotometricInterpretation {photometric}, SamplesPerPixel {samples})"
        )
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if k not in header]
    if missing:
        raise DicomDecodeError(f"{label}: image pixel module lacks {', '.join(missing)}")
    rows, cols = header["Rows"], header["Columns"]
    bits_allocated = header["BitsAllocated"]
    bits_stored = header.get("BitsStored", bits_allocated)
    representation = header.get("PixelRepresentation", 0)
    if rows < 1 or cols < 1:
        raise DicomDecodeError(f"{label}: empty image ({rows} x {cols})")
    if bits_allocated not in (8, 16, 32):
        raise DicomDecodeError(f"{label}: unsupported BitsAllocated {bits_allocated} (expected 8, 16 or 32)")
    if not 1 <= bits_stored <= bits_allocated:
        raise DicomDecodeError(f"{label}: BitsStored {bits_stored} outside 1..BitsAllocated ({bits_allocated})")
    if representation not in (0, 1):
        raise DicomDecodeError(f"{label}: PixelRepresentation {representation} is neither 0 (unsigned) nor 1 (signed)")
    _check_limits(rows, cols, bits_allocated // 8, label, limits, "image")
    return rows, cols, bits_allocated, bits_stored, representation == 1


def _check_limits(rows: int, cols: int, sample_bytes: int, label: str, limits: DecodeLimits, what: str) -> None:
    if rows > limits.max_side or cols > limits.max_side:
        raise DicomDecodeError(
            f"{label}: {what} is {rows} x {cols}, over the size limit (DecodeLimits.max_side {limits.max_side})"
        )
    size = rows * cols * sample_bytes
    if size > limits.max_bytes:
        raise DicomDecodeError(
            f"{label}: {what} needs {size} bytes ({rows} x {cols} x {sample_bytes}), "
            f"over the size limit (DecodeLimits.max_bytes {limits.max_bytes})"
        )


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _rescale(header: dict, label: str, bits_allocated: int) -> tuple[float, float]:
    """(slope, intercept): finite, slope non-zero, and every stored value maps to a finite float32 HU."""
    slope = _first_float(header.get("RescaleSlope"), label, "RescaleSlope", default=1.0)
    intercept = _first_float(header.get("RescaleIntercept"), label, "RescaleIntercept", default=0.0)
    if not math.isfinite(slope) or slope == 0:
        raise DicomDecodeError(f"{label}: RescaleSlope {slope} must be a finite non-zero number")
    if not math.isfinite(intercept):
        raise DicomDecodeError(f"{label}: RescaleIntercept {intercept} must be a finite number")
    if abs(slope) * 2.0**bits_allocated + abs(intercept) > _FLOAT32_MAX:
        raise DicomDecodeError(f"{label}: RescaleSlope {slope} / RescaleIntercept {intercept} overflow float32 HU")
    return slope, intercept


def _first_float(text: str | None, label: str, keyword: str, default: float) -> float:
    """First value of a DS field (`[00040, 00040]` -> 40.0)."""
    if text in (None, ""):
        return default
    try:
        return float(text.split("\\")[0])
    except ValueError:
        raise DicomDecodeError(f"{label}: bad {keyword} value {text!r}") from None


def _float_list(text: str | None) -> list[float]:
    """All values of a DS field; [] (absent) when missing, unparseable or not all finite."""
    if text in (None, ""):
        return []
    try:
        values = [float(v) for v in text.split("\\")]
    except ValueError:
        return []
    # one check for all values: a nan or inf anywhere (or an overflowing sum of absurd values) makes the sum non-finite
    return values if math.isfinite(sum(values)) else []


def _mask_stored_bits(pixels: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Keep the low `bits_stored` bits (sign-extended when signed), as the standard defines."""
    mask = (1 << bits_stored) - 1
    if not signed and int(pixels.max()) <= mask:
        return pixels  # the common case (all of RSNA): no stray high bits, one pass, no copy
    lo, hi = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    if signed and lo <= int(pixels.min()) and int(pixels.max()) <= hi:
        return pixels
    wide = pixels.astype(np.int64) & mask
    if signed:
        sign = 1 << (bits_stored - 1)
        wide = np.where(wide >= sign, wide - (1 << bits_stored), wide)
    return wide.astype(np.int32)


# --- compressed pixel data -------------------------------------------------------------------


def _decode_compressed(header: dict, label: str, syntax: str, limits: DecodeLimits) -> np.ndarray:
    """pydicom's decoder for `syntax`, after checking that a decoder exists and the codestream's own size."""
    name = pydicom.uid.UID(syntax).name
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        raise DicomDecodeError(f"{label}: cannot decode {name} ({syntax}) pixel data (pydicom has no decoder for it)") from None
    if not available:
        raise DicomDecodeError(f"{label}: no decoder for transfer syntax {name} ({syntax}); {CODECS_HINT}")
    if syntax in _JPEG_FAMILY or syntax in _JPEG2000_FAMILY:
        _check_codestream(header, label, syntax, limits)
    elif syntax == pydicom.uid.RLELossless:
        _check_rle(header, label, syntax)
    try:
        arr = header["_dataset"].pixel_array
    except (RuntimeError, NotImplementedError) as e:
        reason = " ".join(line.strip() for line in str(e).splitlines())  # pydicom puts the cause on line 2
        raise DicomDecodeError(f"{label}: cannot decode {name} ({syntax}) pixel data ({reason})") from None
    except Exception as e:
        raise DicomDecodeError(f"{label}: cannot decode {name} ({syntax}) pixel data ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise DicomDecodeError(f"{label}: decoded {name} pixels have shape {arr.shape}, expected one 2-D frame")
    return arr


def _check_codestream(header: dict, label: str, syntax: str, limits: DecodeLimits) -> None:
    """The decoder sizes its output from the codestream, not the DICOM header: check that size first."""
    name = f"{pydicom.uid.UID(syntax).name} ({syntax})"
    frame = _first_frame(header, label, name)
    size = _jpeg_size(frame) if syntax in _JPEG_FAMILY else _jpeg2000_size(frame)
    marker = "SOF" if syntax in _JPEG_FAMILY else "SIZ"
    if size is None:
        raise DicomDecodeError(f"{label}: {name} codestream has no readable {marker} marker")
    rows, cols, components = size
    _check_limits(rows, cols, header["BitsAllocated"] // 8, label, limits, f"{name} codestream")
    if (rows, cols) != (header["Rows"], header["Columns"]):
        raise DicomDecodeError(
            f"{label}: {name} codestream is {rows} x {cols} ({marker}), header says {header['Rows']} x {header['Columns']}"
        )
    if components != 1:
        raise UnsupportedImageError(f"{label}: {name} codestream has {components} components, expected 1 (monochrome)")


def _first_frame(header: dict, label: str, name: str) -> bytes:
    """The first frame's bytes of encapsulated pixel data (its fragments joined)."""
    try:
        return get_frame(header["PixelData"], 0, number_of_frames=1)
    except Exception as e:  # pydicom's fragment parser on damaged items
        raise DicomDecodeError(f"{label}: cannot read the {name} fragments ({type(e).__name__}: {e})") from None


def _check_rle(header: dict, label: str, syntax: str) -> None:
    """pydicom's RLE decoder expands a whole segment (up to 64x its size) before it checks the length: count
    each segment's decoded bytes from its run headers first (PS3.5 annex G), allocating nothing."""
    rle = f"{pydicom.uid.UID(syntax).name} ({syntax})"
    frame = _first_frame(header, label, rle)
    if len(frame) < 64:
        raise DicomDecodeError(f"{label}: {rle} frame of {len(frame)} bytes lacks its 64-byte header")
    count, *offsets = struct.unpack_from("<16I", frame)
    if count != header["BitsAllocated"] // 8:  # one segment per byte of a monochrome sample
        raise DicomDecodeError(f"{label}: {rle} frame has {count} segments, {header['BitsAllocated']}-bit samples need "
                               f"{header['BitsAllocated'] // 8}")
    per_segment = header["Rows"] * header["Columns"]
    bounds = [*offsets[:count], len(frame)]
    for i in range(count):
        start, end = bounds[i], bounds[i + 1]
        if not 64 <= start <= end <= len(frame):
            raise DicomDecodeError(f"{label}: {rle} segment {i + 1} lies outside its frame (offsets {start}..{end})")
        decoded = _packbits_length(frame, start, end, stop=per_segment + _RLE_SLACK)
        if decoded > per_segment + _RLE_SLACK:
            raise DicomDecodeError(f"{label}: {rle} segment {i + 1} decodes past {per_segment + _RLE_SLACK} bytes, "
                                   f"its image needs {per_segment}")


_RLE_SLACK = 128  # a segment may decode a little past its image (padding, one last run); pydicom trims it


def _packbits_length(data: bytes, start: int, end: int, stop: int) -> int:
    """Bytes the PackBits runs in data[start:end] decode to, counted until past `stop`."""
    pos, total = start, 0
    while pos < end and total <= stop:
        run = data[pos]
        if run < 128:  # the next run + 1 bytes literally
            total, pos = total + run + 1, pos + run + 2
        elif run > 128:  # the next byte 257 - run times
            total, pos = total + 257 - run, pos + 2
        else:  # 128: no operation
            pos += 1
    return total


# JPEG (ITU T.81 B.1.1.3) start-of-frame markers: SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC); F7 is JPEG-LS SOF55.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


def _jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from the first SOFn segment of a JPEG / JPEG-LS codestream, or None."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _STANDALONE_MARKERS:
            pos += 2
        elif marker in _SOF_MARKERS:
            if pos + 10 > n:
                return None
            height, width = _unpack(">HH", data, pos + 5)  # after FFCn, Lf (2 bytes), P (1 byte)
            return height, width, data[pos + 9]
        elif marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        else:
            pos += 2 + _unpack(">H", data, pos + 2)[0]
    return None


def _jpeg2000_size(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from the SIZ segment (ITU T.800 A.5.1) after SOC, or None."""
    at = data.find(b"\xff\x4f\xff\x51")  # SOC then SIZ; also found inside a JP2 wrapper
    if at < 0 or at + 42 > len(data):
        return None
    # after SIZ, Lsiz and Rsiz: Xsiz, Ysiz, XOsiz, YOsiz, then 16 bytes of tiling, then Csiz
    xsiz, ysiz, x_offset, y_offset = _unpack(">IIII", data, at + 8)
    components = _unpack(">H", data, at + 40)[0]
    return ysiz - y_offset, xsiz - x_offset, components


CT_MODALITIES = ("CT", "")  # "": no Modality element, accepted (a header that says nothing is not refused for it)


def require_ct(meta: DicomMeta, label: str) -> None:
    """Raise UnsupportedImageError when the header's Modality names another kind of image (MR, CR, ...): its
    pixels would decode, but windows in Hounsfield units mean nothing for them."""
    if meta.modality not in CT_MODALITIES:
        raise UnsupportedImageError(f"{label} ({meta.image_id}): not a CT image (Modality {meta.modality})")


def slice_position(position: list[float], orientation: list[float], instance: list[float]) -> float:
    """Where a slice lies along its series' axis: ImagePositionPatient projected on the slice normal (the cross
    product of ImageOrientationPatient's row and column directions), in mm; else the position's z (RSNA files
    have no InstanceNumber); else InstanceNumber (a slice count, not mm); else nan."""
    if len(position) == 3 and len(orientation) == 6:
        (rx, ry, rz), (cx, cy, cz) = orientation[:3], orientation[3:]
        nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
        norm = math.sqrt(nx * nx + ny * ny + nz * nz)
        if norm > 1e-6:  # directions that are not parallel
            return (position[0] * nx + position[1] * ny + position[2] * nz) / norm
    if len(position) == 3:
        return position[2]
    return instance[0] if len(instance) == 1 else float("nan")


def _meta(header: dict, fixed: bool) -> DicomMeta:
    position = _float_list(header.get("ImagePositionPatient"))
    orientation, instance = _float_list(header.get("ImageOrientationPatient")), _float_list(header.get("InstanceNumber"))
    spacing = _float_list(header.get("PixelSpacing"))
    center, width = _float_list(header.get("WindowCenter")), _float_list(header.get("WindowWidth"))
    return DicomMeta(
        image_id=header.get("SOPInstanceUID", ""),
        modality=header.get("Modality", ""),
        patient_id=header.get("PatientID", ""),
        study_id=header.get("StudyInstanceUID", ""),
        series_id=header.get("SeriesInstanceUID", ""),
        z=position[2] if len(position) == 3 else float("nan"),
        position=slice_position(position, orientation, instance),
        pixel_spacing=(spacing[0], spacing[1]) if len(spacing) == 2 else (float("nan"), float("nan")),
        rows=header["Rows"],
        columns=header["Columns"],
        window_center=center[0] if center else None,
        window_width=width[0] if width else None,
        wrapped_intercept_fixed=fixed,
    )
