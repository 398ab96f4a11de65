"""raysys.dicom: DICOM files written here by pydicom -> HU checked against numpy and pydicom."""

from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, get_decoder

from raysys.dicom import DicomDecodeError, _scan_dataset, _scan_meta, decode, read_dicom

RSNA_DIR = Path(__file__).resolve().parents[2] / "shared" / "rsna-sample"
RSNA_COUNT = 32  # one study of 32 slices, see its README.md

EXPLICIT = uid.ExplicitVRLittleEndian
IMPLICIT = uid.ImplicitVRLittleEndian
IMAGE_ID = "ID_0a1b2c3d4"


# --- fixtures: CT files written by pydicom ----------------------------------------------------


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """Inclusive range of stored values for BitsStored / PixelRepresentation."""
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def random_stored(
    shape: tuple[int, int], bits_stored: int, signed: bool, seed: int = 0, lo: int | None = None, hi: int | None = None
) -> np.ndarray:
    """Random stored values (int64) covering the range, both ends included."""
    rlo, rhi = stored_range(bits_stored, signed)
    lo, hi = rlo if lo is None else lo, rhi if hi is None else hi
    values = np.random.default_rng(seed).integers(lo, hi + 1, size=shape, dtype=np.int64)
    values.flat[0], values.flat[-1] = lo, hi
    return values


def make_ct(
    stored: np.ndarray,
    *,
    bits_allocated: int = 16,
    bits_stored: int = 12,
    signed: bool = False,
    slope: str | None = "1",
    intercept: str | None = "-1024",
    syntax: str = EXPLICIT,
    image_id: str = IMAGE_ID,
    patient_id: str = "ID_5e6f7a8b",
    study_id: str = "ID_1f6d1e8aeb",
    series_id: str = "ID_4d28912ba6",
    position: str | None = "-112\\-9.80802803\\267.219087",
    spacing: str | None = "0.48828125\\0.48828125",
    window: tuple[str, str] | None = ("00040\\00040", "00080\\00080"),
    pixel_bytes: bytes | None = None,
) -> Dataset:
    """A CT image dataset with RSNA-like header fields; `stored` holds the stored pixel values.

    Strings are written as given (DS/IS text), so "00040\\00040" lands in the file verbatim.
    """
    rows, cols = stored.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the `ID_...` UIDs while we build them
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = image_id
        meta.TransferSyntaxUID = syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = uid.CTImageStorage
        ds.SOPInstanceUID = image_id
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_id
        ds.SeriesInstanceUID = series_id
        if position is not None:
            ds.ImagePositionPatient = position
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        if spacing is not None:
            ds.PixelSpacing = spacing
        ds.BitsAllocated = bits_allocated
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = int(signed)
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if intercept is not None:
            ds.RescaleIntercept = intercept
        if slope is not None:
            ds.RescaleSlope = slope
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
        if syntax == uid.ExplicitVRBigEndian:
            dtype = dtype.newbyteorder(">")
        ds.PixelData = stored.astype(dtype).tobytes() if pixel_bytes is None else pixel_bytes
        ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(dicom_bytes(ds))
    return path


def pydicom_hu(data: bytes | Path) -> np.ndarray:
    """HU as pydicom computes it: apply_modality_lut(pixel_array) in float64."""
    ds = pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data)
    return apply_modality_lut(ds.pixel_array, ds)


def rsna_fix_reference(ds: pydicom.Dataset) -> np.ndarray:
    """The published RSNA fix, written out from its definition, then pydicom's modality LUT."""
    arr = ds.pixel_array.astype(np.int64)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100:
        arr = arr + 1000
        arr[arr >= 4096] -= 4096
        ds.RescaleIntercept = -1000
    return apply_modality_lut(arr, ds)


def decoy_item() -> Dataset:
    """A nested item full of tags the reader wants, all with wrong values: must never be used."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        item = Dataset()
        item.SOPInstanceUID = "ID_decoy"
        item.SamplesPerPixel = 1
        item.PhotometricInterpretation = "MONOCHROME2"
        item.Rows, item.Columns = 4, 4
        item.BitsAllocated, item.BitsStored, item.HighBit, item.PixelRepresentation = 8, 8, 7, 0
        item.RescaleIntercept, item.RescaleSlope = "999", "7"
        item.PixelData = bytes(range(16))
        item["PixelData"].VR = "OB"
    return item


def expected_hu(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return stored.astype(np.float64) * slope + intercept


# --- modality transform: slope, intercept, representation, bits stored ------------------------

# (bits_stored, signed, slope, intercept): none of these is the RSNA defect.
RESCALES = [
    (12, False, "1", "-1024"),
    (12, False, "2", "-1024"),
    (12, False, "0.5", "-1024"),
    (12, False, "1", "-100"),  # the defect needs intercept > -100: -100 itself is genuine
    (12, True, "1", "-1024"),
    (12, True, "1", "0"),  # signed 12-bit with intercept 0 is genuine signed HU
    (12, True, "0.5", "1"),
    (16, False, "1", "-1024"),
    (16, False, "1", "0"),  # 16 bits stored: never the defect
    (16, False, "0.5", "-32768"),
    (16, True, "1", "0"),
    (16, True, "2", "-1024"),
    (16, True, "0.5", "-1024"),
]


@pytest.mark.parametrize("bits_stored, signed, slope, intercept", RESCALES)
def test_rescale_matches_numpy_and_pydicom(tmp_path, bits_stored, signed, slope, intercept):
    stored = random_stored((40, 56), bits_stored, signed, seed=bits_stored)
    path = write(make_ct(stored, bits_stored=bits_stored, signed=signed, slope=slope, intercept=intercept), tmp_path / "a.dcm")
    hu, meta = read_dicom(path)
    assert hu.dtype == np.float32 and hu.shape == (40, 56)
    expected = expected_hu(stored, float(slope), float(intercept))
    # slopes 2 and 0.5 and integer intercepts are exact in float32: demand equality
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))
    assert meta.wrapped_intercept_fixed is False


def test_non_dyadic_slope_is_within_float32_rounding(tmp_path):
    stored = random_stored((32, 32), 16, True, seed=3)
    path = write(make_ct(stored, bits_stored=16, signed=True, slope="0.1", intercept="-1024.5"), tmp_path / "a.dcm")
    hu, _ = read_dicom(path)
    np.testing.assert_allclose(hu, expected_hu(stored, 0.1, -1024.5), rtol=1e-6, atol=1e-3)


def test_missing_rescale_fields_mean_identity(tmp_path):
    stored = random_stored((16, 16), 16, True, seed=4)
    path = write(make_ct(stored, bits_stored=16, signed=True, slope=None, intercept=None), tmp_path / "a.dcm")
    hu, _ = read_dicom(path)
    np.testing.assert_array_equal(hu, stored.astype(np.float32))


def test_bits_allocated_8(tmp_path):
    stored = random_stored((20, 24), 8, False, seed=8)
    path = write(make_ct(stored, bits_allocated=8, bits_stored=8, slope="4", intercept="-1024"), tmp_path / "a.dcm")
    hu, _ = read_dicom(path)
    np.testing.assert_array_equal(hu, expected_hu(stored, 4, -1024).astype(np.float32))
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))


def test_unsigned_high_bits_above_bits_stored_are_ignored(tmp_path):
    # BitsStored 12 in 16 allocated: the top 4 bits are not part of the value (PS3.5 8.1.1).
    stored = random_stored((24, 24), 12, False, seed=5)
    noisy = stored | (np.random.default_rng(6).integers(0, 16, size=stored.shape) << 12)
    path = write(make_ct(noisy, bits_stored=12, intercept="-1024"), tmp_path / "a.dcm")
    hu, _ = read_dicom(path)
    np.testing.assert_array_equal(hu, expected_hu(stored, 1, -1024).astype(np.float32))
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))


def test_signed_12_bit_without_sign_extension(tmp_path):
    # Signed 12-bit values written with only their low 12 bits set: bit 11 is the sign.
    stored = random_stored((24, 24), 12, True, seed=7)
    raw = (stored & 0xFFF).astype(np.uint16).view(np.int16)
    path = write(make_ct(raw, bits_stored=12, signed=True, intercept="0"), tmp_path / "a.dcm")
    hu, _ = read_dicom(path)
    np.testing.assert_array_equal(hu, stored.astype(np.float32))
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))


def test_decode_keeps_stored_pixels_and_transform(tmp_path):
    stored = random_stored((10, 12), 16, True, seed=9)
    path = write(make_ct(stored, bits_stored=16, signed=True, slope="2", intercept="-1024"), tmp_path / "a.dcm")
    dslice = decode(path)
    np.testing.assert_array_equal(dslice.pixels, stored)
    assert np.issubdtype(dslice.pixels.dtype, np.integer)
    assert (dslice.slope, dslice.intercept) == (2.0, -1024.0)
    np.testing.assert_array_equal(dslice.hu(), expected_hu(stored, 2, -1024).astype(np.float32))


# --- the RSNA wrapped-intercept defect --------------------------------------------------------


def wrapped_fixture(seed: int = 11, shape: tuple[int, int] = (48, 40)) -> tuple[np.ndarray, np.ndarray]:
    """(true HU, stored values): signed HU in [-1000, 3095] stored as 12-bit two's complement."""
    hu_true = np.random.default_rng(seed).integers(-1000, 3096, size=shape, dtype=np.int64)
    hu_true.flat[:6] = [-1000, -1, 0, 1, 3095, -999]
    stored = np.mod(hu_true, 4096)  # what the scanner wrote: the low 12 bits, read back as unsigned
    assert stored.min() >= 0 and stored.max() <= 4095
    return hu_true, stored


@pytest.mark.parametrize("intercept", ["1", "0", "-99"])
def test_wrapped_intercept_defect_is_repaired(tmp_path, intercept):
    hu_true, stored = wrapped_fixture()
    path = write(make_ct(stored, bits_stored=12, signed=False, intercept=intercept), tmp_path / "ID_wrapped.dcm")
    before = path.read_bytes()
    hu, meta = read_dicom(path)
    assert meta.wrapped_intercept_fixed is True
    np.testing.assert_array_equal(hu, hu_true.astype(np.float32))
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(hu, rsna_fix_reference(ds).astype(np.float32))
    dslice = decode(path)
    assert dslice.intercept == -1000.0 and dslice.slope == 1.0
    assert path.read_bytes() == before  # the repair happens in memory only


def test_wrapped_intercept_defect_from_bytes_leaves_input_unchanged():
    hu_true, stored = wrapped_fixture(seed=12)
    data = dicom_bytes(make_ct(stored, bits_stored=12, intercept="1"))
    copy = bytes(bytearray(data))
    hu, meta = read_dicom(data)
    assert meta.wrapped_intercept_fixed
    np.testing.assert_array_equal(hu, hu_true.astype(np.float32))
    assert data == copy


def test_wrapped_intercept_defect_on_the_pydicom_path(tmp_path):
    # An undefined-length sequence sends the file through pydicom: the repair must still apply.
    hu_true, stored = wrapped_fixture(seed=13)
    ds = make_ct(stored, bits_stored=12, intercept="1")
    ds.IconImageSequence = [decoy_item()]
    ds["IconImageSequence"].is_undefined_length = True
    path = write(ds, tmp_path / "a.dcm")
    assert pydicom.dcmread(path)["IconImageSequence"].is_undefined_length
    hu, meta = read_dicom(path)
    assert meta.wrapped_intercept_fixed
    np.testing.assert_array_equal(hu, hu_true.astype(np.float32))


def test_wrapped_intercept_defect_in_rle_file(tmp_path):
    hu_true, stored = wrapped_fixture(seed=14)
    ds = make_ct(stored, bits_stored=12, intercept="0")
    ds.compress(uid.RLELossless, stored.astype(np.uint16), generate_instance_uid=False)
    path = write(ds, tmp_path / "a.dcm")
    hu, meta = read_dicom(path)
    assert meta.wrapped_intercept_fixed
    np.testing.assert_array_equal(hu, hu_true.astype(np.float32))


# --- header fields ----------------------------------------------------------------------------


def test_meta_fields(tmp_path):
    stored = random_stored((638, 490), 12, False, seed=15)
    path = write(make_ct(stored), tmp_path / "ID_0a1b2c3d4.dcm")
    _, meta = read_dicom(path)
    assert meta.image_id == IMAGE_ID
    assert meta.patient_id == "ID_5e6f7a8b"
    assert meta.study_id == "ID_1f6d1e8aeb"
    assert meta.series_id == "ID_4d28912ba6"
    assert meta.z == 267.219087
    assert meta.pixel_spacing == (0.48828125, 0.48828125)
    assert (meta.rows, meta.columns) == (638, 490)
    assert meta.window_center == 40.0 and meta.window_width == 80.0
    assert meta.wrapped_intercept_fixed is False


def test_multi_valued_window_is_in_the_file_verbatim_and_read_as_first_value(tmp_path):
    stored = random_stored((8, 8), 12, False)
    data = dicom_bytes(make_ct(stored, window=("00040\\00050", "00080\\00090")))
    assert b"00040\\00050" in data  # the fixture really carries the RSNA-style text
    _, meta = read_dicom(data)
    assert meta.window_center == 40.0 and meta.window_width == 80.0


def test_absent_optional_fields(tmp_path):
    stored = random_stored((8, 8), 12, False)
    _, meta = read_dicom(dicom_bytes(make_ct(stored, position=None, spacing=None, window=None)))
    assert math.isnan(meta.z)
    assert all(math.isnan(v) for v in meta.pixel_spacing)
    assert meta.window_center is None and meta.window_width is None


def test_single_valued_window_and_anisotropic_spacing(tmp_path):
    stored = random_stored((8, 8), 12, False)
    data = dicom_bytes(make_ct(stored, window=("-600", "1500"), spacing="0.5\\0.75", position="0\\0\\-12.5"))
    _, meta = read_dicom(data)
    assert (meta.window_center, meta.window_width) == (-600.0, 1500.0)
    assert meta.pixel_spacing == (0.5, 0.75)
    assert meta.z == -12.5


def reading_is_silent(data: bytes, caplog) -> None:
    caplog.clear()
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_dicom(data)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records] == []


def test_id_uids_read_without_warnings_or_logs(caplog):
    data = dicom_bytes(make_ct(random_stored((16, 16), 12, False)))
    reading_is_silent(data, caplog)


def test_id_uids_silent_on_the_pydicom_path(caplog):
    ds = make_ct(random_stored((16, 16), 12, False))
    ds.IconImageSequence = [decoy_item()]
    ds["IconImageSequence"].is_undefined_length = True
    reading_is_silent(dicom_bytes(ds), caplog)


def test_id_uids_silent_for_rle(caplog):
    stored = random_stored((16, 16), 12, False)
    ds = make_ct(stored)
    ds.compress(uid.RLELossless, stored.astype(np.uint16), generate_instance_uid=False)
    reading_is_silent(dicom_bytes(ds), caplog)


# --- sizes, VR encodings, file structure ------------------------------------------------------


@pytest.mark.parametrize("shape", [(512, 512), (638, 490), (490, 638), (768, 768), (430, 404), (1, 7)])
def test_sizes(tmp_path, shape):
    stored = random_stored(shape, 12, False, seed=shape[0])
    path = write(make_ct(stored), tmp_path / "a.dcm")
    hu, meta = read_dicom(path)
    assert hu.shape == shape and (meta.rows, meta.columns) == shape
    np.testing.assert_array_equal(hu, expected_hu(stored, 1, -1024).astype(np.float32))
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("signed, slope, intercept", [(False, "1", "-1024"), (True, "2", "-1024"), (True, "0.5", "0")])
def test_explicit_and_implicit_vr(tmp_path, syntax, signed, slope, intercept):
    stored = random_stored((64, 48), 16 if signed else 12, signed, seed=21)
    ds = make_ct(stored, bits_stored=16 if signed else 12, signed=signed, slope=slope, intercept=intercept, syntax=syntax)
    path = write(ds, tmp_path / "a.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    hu, meta = read_dicom(path)
    np.testing.assert_array_equal(hu, expected_hu(stored, float(slope), float(intercept)).astype(np.float32))
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))
    assert meta.image_id == IMAGE_ID and meta.window_center == 40.0 and meta.z == 267.219087


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("undefined_length", [False, True])
def test_sequences_before_pixel_data(tmp_path, syntax, undefined_length):
    stored = random_stored((50, 60), 16, True, seed=22)
    ds = make_ct(stored, bits_stored=16, signed=True, slope="2", intercept="-1024", syntax=syntax)
    # one sequence before the image pixel module, one (an icon image, with its own pixels) after it
    ds.ReferencedImageSequence = [decoy_item()]
    ds.IconImageSequence = [decoy_item()]
    for keyword in ("ReferencedImageSequence", "IconImageSequence"):
        ds[keyword].is_undefined_length = undefined_length
    path = write(ds, tmp_path / "a.dcm")
    back = pydicom.dcmread(path)
    assert back["IconImageSequence"].is_undefined_length is undefined_length  # the fixture is what it claims
    hu, meta = read_dicom(path)
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))
    np.testing.assert_array_equal(hu, expected_hu(stored, 2, -1024).astype(np.float32))
    assert meta.image_id == IMAGE_ID and (meta.rows, meta.columns) == (50, 60)


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("undefined_length", [False, True])
def test_direct_scan_reads_both_vr_encodings_and_defers_undefined_lengths(syntax, undefined_length):
    # White-box: the fast path must really parse implicit VR, not silently hand every file to pydicom.
    stored = random_stored((12, 10), 12, False)
    ds = make_ct(stored, syntax=syntax)
    ds.IconImageSequence = [decoy_item()]
    ds["IconImageSequence"].is_undefined_length = undefined_length
    data = dicom_bytes(ds)
    file_syntax, start = _scan_meta(data, "a.dcm")
    assert file_syntax == syntax
    header = _scan_dataset(data, start, syntax, "a.dcm")
    if undefined_length:
        assert header is None
        return
    assert header is not None
    assert (header["Rows"], header["Columns"], header["BitsStored"]) == (12, 10, 12)
    assert header["SOPInstanceUID"] == IMAGE_ID and header["RescaleIntercept"] == "-1024"
    assert bytes(header["PixelData"]) == stored.astype("<u2").tobytes()


def test_long_vr_private_elements_before_pixel_data(tmp_path):
    stored = random_stored((30, 30), 12, False, seed=23)
    ds = make_ct(stored)
    block = ds.private_block(0x0029, "RAYSYS TEST", create=True)
    block.add_new(0x10, "OB", b"\x00\x01" * 40000)  # > 64 KiB: needs the 4-byte length
    block.add_new(0x11, "UT", "x" * 70001)
    block.add_new(0x12, "UN", b"\x28\x00\x10\x00" * 3)  # bytes that look like a Rows tag
    path = write(ds, tmp_path / "a.dcm")
    hu, meta = read_dicom(path)
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))
    assert (meta.rows, meta.columns) == (30, 30)


@pytest.mark.parametrize("syntax", [uid.ExplicitVRBigEndian, uid.DeflatedExplicitVRLittleEndian])
def test_other_uncompressed_syntaxes_via_pydicom(tmp_path, syntax):
    stored = random_stored((40, 36), 16, True, seed=24)
    path = write(make_ct(stored, bits_stored=16, signed=True, slope="2", intercept="-1024", syntax=syntax), tmp_path / "a.dcm")
    hu, meta = read_dicom(path)
    np.testing.assert_array_equal(hu, expected_hu(stored, 2, -1024).astype(np.float32))
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))
    assert meta.image_id == IMAGE_ID


# --- compressed transfer syntaxes -------------------------------------------------------------


@pytest.mark.parametrize(
    "bits_stored, signed, slope, intercept",
    [(12, False, "1", "-1024"), (16, True, "1", "0"), (16, True, "0.5", "-1024"), (16, False, "2", "-2048")],
)
def test_rle_lossless(tmp_path, bits_stored, signed, slope, intercept):
    stored = random_stored((70, 90), bits_stored, signed, seed=31)
    ds = make_ct(stored, bits_stored=bits_stored, signed=signed, slope=slope, intercept=intercept)
    ds.compress(uid.RLELossless, stored.astype(np.int16 if signed else np.uint16), generate_instance_uid=False)
    path = write(ds, tmp_path / "a.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid.RLELossless
    hu, meta = read_dicom(path)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, expected_hu(stored, float(slope), float(intercept)).astype(np.float32))
    np.testing.assert_array_equal(hu, pydicom_hu(path).astype(np.float32))
    assert meta.image_id == IMAGE_ID and meta.window_center == 40.0


def junk_encapsulated(tmp_path: Path, syntax: str) -> Path:
    stored = random_stored((16, 16), 12, False)
    ds = make_ct(stored, syntax=syntax, pixel_bytes=encapsulate([b"\xff\xd8 not a real codestream \xff\xd9"]))
    ds["PixelData"].VR = "OB"
    return write(ds, tmp_path / "compressed.dcm")


@pytest.mark.parametrize(
    "syntax", [uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.RLELossless]
)
def test_undecodable_compressed_pixels(tmp_path, syntax):
    path = junk_encapsulated(tmp_path, syntax)
    with pytest.raises(DicomDecodeError) as info:
        read_dicom(path)
    message = str(info.value)
    assert str(path) in message and IMAGE_ID in message
    assert syntax in message and syntax.name in message
    # the install hint only where pydicom really has no usable decoder (not when the data is junk)
    assert ("raysys[dicom-codecs]" in message) is (not get_decoder(syntax).is_available)


def test_jpeg_lossless_without_codecs_names_the_extra(tmp_path):
    path = junk_encapsulated(tmp_path, uid.JPEGLosslessSV1)
    with pytest.raises(DicomDecodeError, match=r"1\.2\.840\.10008\.1\.2\.4\.70") as info:
        read_dicom(path)
    if not get_decoder(uid.JPEGLosslessSV1).is_available:  # pylibjpeg/gdcm absent, as in the default install
        assert "raysys[dicom-codecs]" in str(info.value)


# --- bad input --------------------------------------------------------------------------------


def assert_refused(source, *needles: str) -> str:
    """read_dicom must raise DicomDecodeError naming the source, never return an image."""
    with pytest.raises(DicomDecodeError) as info:
        read_dicom(source)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


def test_random_bytes_file(tmp_path):
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(41).bytes(600_000))
    assert_refused(path, str(path), "not a DICOM")


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("PatientID,Label\nID_1,1\n" * 50)
    assert_refused(str(path), str(path), "not a DICOM")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    assert_refused(path, str(path))


def test_bytes_use_the_given_name():
    with pytest.raises(DicomDecodeError, match="upload-7.dcm"):
        read_dicom(b"hello" * 100, name="upload-7.dcm")


def test_nonexistent_path(tmp_path):
    path = tmp_path / "missing" / "ID_nothere.dcm"
    assert_refused(path, str(path))
    assert_refused(str(path), str(path))


def test_directory_path(tmp_path):
    assert_refused(tmp_path, str(tmp_path))


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_file_cut_inside_pixel_data(tmp_path, syntax, keep):
    stored = random_stored((64, 64), 12, False, seed=42)
    data = dicom_bytes(make_ct(stored, syntax=syntax))
    pixel_start = len(data) - stored.size * 2
    cut = pixel_start + int(stored.size * 2 * keep)
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:cut])
    assert_refused(path, str(path), IMAGE_ID, "8192")  # 64 * 64 * 2 bytes expected


def test_truncated_rle_file(tmp_path):
    stored = random_stored((64, 64), 12, False, seed=43)
    ds = make_ct(stored)
    ds.compress(uid.RLELossless, stored.astype(np.uint16), generate_instance_uid=False)
    data = dicom_bytes(ds)
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 100])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the missing sequence delimiter
        assert_refused(path, str(path))


def test_short_pixel_data_element(tmp_path):
    stored = random_stored((32, 32), 12, False)
    ds = make_ct(stored, pixel_bytes=stored.astype("<u2").tobytes()[:1024])
    assert_refused(write(ds, tmp_path / "short.dcm"), "short.dcm", IMAGE_ID, "1024", "2048")


def test_short_pixel_data_on_the_pydicom_path(tmp_path):
    stored = random_stored((32, 32), 12, False)
    ds = make_ct(stored, pixel_bytes=stored.astype("<u2").tobytes()[:1024])
    ds.IconImageSequence = [decoy_item()]
    ds["IconImageSequence"].is_undefined_length = True
    assert_refused(write(ds, tmp_path / "short.dcm"), "short.dcm", "1024", "2048")


def test_no_pixel_data(tmp_path):
    ds = make_ct(random_stored((8, 8), 12, False))
    del ds.PixelData
    assert_refused(write(ds, tmp_path / "nopix.dcm"), "nopix.dcm", IMAGE_ID, "PixelData")


def test_multi_frame(tmp_path):
    frames = random_stored((2 * 16, 16), 12, False)
    ds = make_ct(frames[:16])
    ds.NumberOfFrames = "2"
    ds.PixelData = frames.astype("<u2").tobytes()
    assert_refused(write(ds, tmp_path / "multi.dcm"), "multi.dcm", IMAGE_ID, "2 frames")


def test_rgb(tmp_path):
    rgb = np.random.default_rng(44).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    ds = make_ct(rgb[..., 0], bits_allocated=8, bits_stored=8, pixel_bytes=rgb.tobytes())
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    path = write(ds, tmp_path / "rgb.dcm")
    assert pydicom.dcmread(path).pixel_array.shape == (16, 16, 3)  # a valid colour image
    assert_refused(path, "rgb.dcm", IMAGE_ID, "RGB")


def test_bad_rescale_value_is_an_error_not_a_default(tmp_path):
    good = dicom_bytes(make_ct(random_stored((8, 8), 12, False), slope="7.77"))
    assert good.count(b"7.77") == 1
    data = good.replace(b"7.77", b"abcd")  # pydicom refuses to write a bad DS: patch the bytes
    with pytest.raises(DicomDecodeError, match="RescaleSlope"):
        read_dicom(data)


# --- sources ----------------------------------------------------------------------------------


def test_bytes_str_and_path_agree(tmp_path):
    stored = random_stored((64, 80), 16, True, seed=51)
    path = write(make_ct(stored, bits_stored=16, signed=True, slope="2", intercept="-1024"), tmp_path / "a.dcm")
    results = [read_dicom(source) for source in (path.read_bytes(), str(path), path)]
    for hu, meta in results:
        np.testing.assert_array_equal(hu, expected_hu(stored, 2, -1024).astype(np.float32))
        assert meta == results[0][1]


def test_error_label_for_bytes_is_the_image_id():
    ds = make_ct(random_stored((8, 8), 12, False))
    del ds.PixelData
    with pytest.raises(DicomDecodeError, match=IMAGE_ID):
        read_dicom(dicom_bytes(ds))


# --- the real RSNA study in ../shared/rsna-sample ---------------------------------------------


# The study is not part of the repository (patient data stays out of it): where the checkout has no
# ../shared/rsna-sample beside it, these tests say so and skip; where it has one, all 32 files must be there.
needs_rsna = pytest.mark.skipif(not RSNA_DIR.is_dir(), reason=f"{RSNA_DIR} not found (not part of the repository)")


def rsna_files() -> list[Path]:
    return sorted(RSNA_DIR.glob("*.dcm"))


@needs_rsna
def test_rsna_sample_is_present():
    files = rsna_files()
    assert len(files) == RSNA_COUNT, [f.name for f in files]


@needs_rsna
@pytest.mark.parametrize("index", range(RSNA_COUNT))
def test_rsna_file_matches_pydicom(index, caplog):
    path = rsna_files()[index]
    data = path.read_bytes()
    reading_is_silent(data, caplog)  # real `ID_...` UIDs: not a word from pydicom
    hu, meta = read_dicom(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        reference = rsna_fix_reference(ds)
    assert hu.dtype == np.float32 and hu.shape == (ds.Rows, ds.Columns)
    np.testing.assert_array_equal(hu, reference.astype(np.float32))
    assert meta.image_id == path.stem == ds.SOPInstanceUID
    assert meta.patient_id == ds.PatientID
    assert meta.study_id == ds.StudyInstanceUID and meta.series_id == ds.SeriesInstanceUID
    assert meta.z == float(ds.ImagePositionPatient[2])
    assert meta.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert meta.window_center == float(ds.WindowCenter[0]) and meta.window_width == float(ds.WindowWidth[0])
    assert path.read_bytes() == data


@pytest.mark.parametrize("path", ["direct", "pydicom"])
def test_slice_position_along_the_normal_of_a_tilted_slice(tmp_path, path):
    stored = np.arange(16, dtype=np.int64).reshape(4, 4)
    ds = make_ct(stored, position="-112\\-9.8\\267.2")
    tilt = np.deg2rad(20.0)  # gantry tilt: the column direction leaves the axial plane
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
    ds.InstanceNumber = 7
    if path == "pydicom":  # an undefined-length sequence sends the file through pydicom's parser
        ds.ReferencedImageSequence = pydicom.Sequence([Dataset()])
        ds["ReferencedImageSequence"].is_undefined_length = True
    meta = read_dicom(write(ds, tmp_path / "tilted.dcm"))[1]
    normal = np.cross(row, col)
    assert meta.position == pytest.approx(float(np.dot([-112, -9.8, 267.2], normal / np.linalg.norm(normal))), abs=1e-5)
    assert meta.position != pytest.approx(267.2)  # not merely z
    assert meta.z == pytest.approx(267.2)


def test_slice_position_falls_back_to_z_then_instance_number(tmp_path):
    stored = np.arange(16, dtype=np.int64).reshape(4, 4)
    no_orientation = make_ct(stored, position="1\\2\\33.5")
    assert read_dicom(write(no_orientation, tmp_path / "a.dcm"))[1].position == 33.5
    no_position = make_ct(stored, position=None)
    no_position.InstanceNumber = 12
    assert read_dicom(write(no_position, tmp_path / "b.dcm"))[1].position == 12.0
    nothing = make_ct(stored, position=None)
    assert np.isnan(read_dicom(write(nothing, tmp_path / "c.dcm"))[1].position)
