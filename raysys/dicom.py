"""DICOM bytes -> Hounsfield units (float32) + the header fields raysys uses."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

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
class DicomMeta:
    """Header fields raysys uses. PatientID is kept only for splitting; never log it."""

    image_id: str  # SOPInstanceUID, e.g. "ID_000000e27"
    modality: str  # "CT" for every file raysys is meant for; "" when absent
    patient_id: str
    study_id: str
    series_id: str
    z: float  # ImagePositionPatient[2] in mm; nan when absent
    pixel_spacing: tuple[float, float]  # (row, column) mm; (nan, nan) when absent
    rows: int
    columns: int
    window_center: float | None  # the header's first WindowCenter, if any
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


def read_dicom(source: bytes | str | Path, name: str | None = None) -> tuple[np.ndarray, DicomMeta]:
    """Read one CT slice: (HU float32 (H, W), meta). Raises DicomDecodeError on bad input."""
    dslice = decode(source, name)
    return dslice.hu(), dslice.meta


def decode(source: bytes | str | Path, name: str | None = None) -> DicomSlice:
    """Parse and validate one single-frame monochrome DICOM; pixels stay in their stored dtype.

    `name` labels the source in error messages (defaults to the path, or "<bytes>").
    Uncompressed little-endian files (all of RSNA) take a direct header scan that
    reads only the tags raysys uses; everything else goes through pydicom.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as f:
                source = f.read()
        except OSError as e:
            raise DicomDecodeError(f"{label}: cannot read file ({e.strerror or e})") from None
    buf = bytes(source) if not isinstance(source, bytes) else source
    header = _scan_native(buf)
    if header is None:
        header = _header_from_pydicom(buf, label)
    image_id = header.get("SOPInstanceUID", "")
    if image_id:
        label = image_id if label == "<bytes>" else f"{label} ({image_id})"
    pixels, slope, intercept, fixed = _pixels(header, label)
    return DicomSlice(pixels=pixels, slope=slope, intercept=intercept, meta=_meta(header, fixed))


# --- the direct scan -------------------------------------------------------------------------

# The tags raysys reads: tag -> (keyword, value kind). "US" is a little-endian uint16;
# "str" is text (UI, LO, CS, DS, IS), multi-values split on backslash later.
_WANTED = {
    0x00020010: ("TransferSyntaxUID", "str"),
    0x00080018: ("SOPInstanceUID", "str"),
    0x00080060: ("Modality", "str"),
    0x00100020: ("PatientID", "str"),
    0x0020000D: ("StudyInstanceUID", "str"),
    0x0020000E: ("SeriesInstanceUID", "str"),
    0x00200032: ("ImagePositionPatient", "str"),
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
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_NATIVE_LE = {_IMPLICIT_LE, _EXPLICIT_LE}
_UNDEFINED = 0xFFFFFFFF
_unpack = struct.unpack_from


def _scan_native(buf: bytes) -> dict | None:
    """Header fields + PixelData (as a memoryview) of a plain little-endian file, or None.

    None means "let pydicom decide": no DICM marker, a compressed or big-endian
    syntax, an undefined-length element, or a header that ends early.
    """
    n = len(buf)
    if n < 144 or buf[128:132] != b"DICM":
        return None
    header: dict = {}
    pos, explicit, in_meta = 132, True, True
    while pos + 8 <= n:
        group, element = _unpack("<HH", buf, pos)
        if in_meta and group != 2:
            in_meta = False
            syntax = header.get("TransferSyntaxUID")
            if syntax not in _NATIVE_LE:
                return None
            explicit = syntax == _EXPLICIT_LE
        tag = group << 16 | element
        if explicit:
            if buf[pos + 4 : pos + 6] in _LONG_VRS:
                length, start = _unpack("<I", buf, pos + 8)[0], pos + 12
            else:
                length, start = _unpack("<H", buf, pos + 6)[0], pos + 8
        else:
            length, start = _unpack("<I", buf, pos + 4)[0], pos + 8
        if length == _UNDEFINED:
            return None
        if tag == _PIXEL_DATA:
            header["PixelData"] = memoryview(buf)[start : start + length]
            header["PixelDataLength"] = length
            return header
        wanted = _WANTED.get(tag)
        if wanted is not None:
            keyword, kind = wanted
            raw = buf[start : start + length]
            if kind == "US":
                if length != 2:
                    return None
                header[keyword] = _unpack("<H", raw)[0]
            else:
                header[keyword] = raw.decode("latin-1").strip(" \x00")
        pos = start + length
    return None  # no PixelData before the end: pydicom names the problem


def _header_from_pydicom(buf: bytes, label: str) -> dict:
    """The same header dict as _scan_native, from pydicom (any syntax, any structure)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(buf))
    except InvalidDicomError:
        raise DicomDecodeError(f"{label}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except Exception as e:  # pydicom raises many types on damaged headers
        raise DicomDecodeError(f"{label}: unreadable DICOM header ({type(e).__name__}: {e})") from None
    header: dict = {}
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        header["TransferSyntaxUID"] = str(file_meta.TransferSyntaxUID)
    for keyword, kind in _WANTED.values():
        if keyword == "TransferSyntaxUID" or keyword not in ds:
            continue
        value = ds[keyword].value
        if value is None or value == "":
            continue
        if kind == "US":
            header[keyword] = int(value)
        elif isinstance(value, pydicom.multival.MultiValue):
            header[keyword] = "\\".join(str(v) for v in value)
        else:
            header[keyword] = str(value)
    if "PixelData" in ds:
        header["PixelDataLength"] = len(ds.PixelData)
        header["PixelData"] = ds.PixelData
        header["_dataset"] = ds  # compressed syntaxes decode through pydicom's plugins
    return header


# --- pixels and meta -------------------------------------------------------------------------


def _pixels(header: dict, label: str) -> tuple[np.ndarray, float, float, bool]:
    if "PixelData" not in header:
        raise DicomDecodeError(f"{label}: no PixelData element")
    frames = _ints(header.get("NumberOfFrames"), default=1)
    if frames != 1:
        raise UnsupportedImageError(f"{label}: multi-frame image ({frames} frames); raysys reads single CT slices")
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
    signed = header.get("PixelRepresentation", 0) == 1
    if rows < 1 or cols < 1:
        raise DicomDecodeError(f"{label}: empty image ({rows} x {cols})")

    syntax = header.get("TransferSyntaxUID", _IMPLICIT_LE)
    if syntax in _NATIVE_LE:
        if bits_allocated not in (8, 16, 32):
            raise DicomDecodeError(f"{label}: unsupported BitsAllocated {bits_allocated}")
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
        expected = rows * cols * dtype.itemsize
        data = header["PixelData"]
        if len(data) < expected:
            raise DicomDecodeError(
                f"{label}: pixel data is {len(data)} bytes, expected {expected} ({rows} x {cols} x {dtype.itemsize})"
            )
        pixels = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
        if bits_stored < bits_allocated:
            pixels = _mask_stored_bits(pixels, bits_stored, signed)
    else:
        pixels = _decode_compressed(header["_dataset"], label, syntax)
        if pixels.shape != (rows, cols):
            raise DicomDecodeError(f"{label}: decoded shape {pixels.shape}, header says {rows} x {cols}")

    slope = _floats(header.get("RescaleSlope"), label, "RescaleSlope", default=1.0)
    intercept = _floats(header.get("RescaleIntercept"), label, "RescaleIntercept", default=0.0)
    fixed = False
    if bits_stored == 12 and not signed and intercept > -100:
        pixels = pixels.astype(np.int32) + _WRAP_SHIFT
        pixels[pixels >= _WRAP_MODULUS] -= _WRAP_MODULUS
        intercept = -float(_WRAP_SHIFT)
        fixed = True
    return pixels, slope, intercept, fixed


def _ints(text: str | None, default: int) -> int:
    try:
        return int(float(str(text).split("\\")[0])) if text not in (None, "") else default
    except ValueError:
        return default


def _floats(text: str | None, label: str, keyword: str, default: float) -> float:
    """First value of a DS field (`[00040, 00040]` -> 40.0)."""
    if text in (None, ""):
        return default
    try:
        return float(str(text).split("\\")[0])
    except ValueError:
        raise DicomDecodeError(f"{label}: bad {keyword} value {text!r}") from None


def _float_list(text: str | None) -> list[float]:
    if text in (None, ""):
        return []
    try:
        return [float(v) for v in str(text).split("\\")]
    except ValueError:
        return []


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


def _decode_compressed(ds: pydicom.Dataset, label: str, syntax: str) -> np.ndarray:
    name = pydicom.uid.UID(syntax).name
    try:
        arr = ds.pixel_array
    except (RuntimeError, NotImplementedError) as e:
        text = str(e)
        # Only pydicom's "plugins are missing dependencies" means a codec is absent; "exceptions were
        # raised by all available plugins" means a decoder ran and the data is bad.
        if "missing dependencies" in text:
            raise DicomDecodeError(f"{label}: no decoder for transfer syntax {name} ({syntax}); {CODECS_HINT}") from None
        reason = " ".join(line.strip() for line in text.splitlines())  # pydicom puts the cause on line 2
        raise DicomDecodeError(f"{label}: cannot decode {name} ({syntax}) pixel data ({reason})") from None
    except Exception as e:
        raise DicomDecodeError(f"{label}: cannot decode {name} ({syntax}) pixel data ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise DicomDecodeError(f"{label}: decoded {name} pixels have shape {arr.shape}, expected one 2-D frame")
    return arr


def _meta(header: dict, fixed: bool) -> DicomMeta:
    position = _float_list(header.get("ImagePositionPatient"))
    spacing = _float_list(header.get("PixelSpacing"))
    center, width = _float_list(header.get("WindowCenter")), _float_list(header.get("WindowWidth"))
    return DicomMeta(
        image_id=header.get("SOPInstanceUID", ""),
        modality=header.get("Modality", ""),
        patient_id=header.get("PatientID", ""),
        study_id=header.get("StudyInstanceUID", ""),
        series_id=header.get("SeriesInstanceUID", ""),
        z=position[2] if len(position) == 3 else float("nan"),
        pixel_spacing=(spacing[0], spacing[1]) if len(spacing) == 2 else (float("nan"), float("nan")),
        rows=header["Rows"],
        columns=header["Columns"],
        window_center=center[0] if center else None,
        window_width=width[0] if width else None,
        wrapped_intercept_fixed=fixed,
    )
