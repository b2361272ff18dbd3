"""Unit tests of client.data.dicom_read on tiny, hand-checkable synthetic DICOM files."""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from client.data.dicom_read import (
    Preprocessing,
    Reason,
    UnusableInputError,
    discover_files,
    load_bytes,
    parse_dataset,
    read_dicom,
)
from common.errors import ConfigError


def make_dataset(
    pixels: np.ndarray | None,
    *,
    sop_class: str = CTImageStorage,
    photometric: str = "MONOCHROME2",
    **attrs: Any,
) -> Dataset:
    """A minimal Part 10 data set; ``pixels`` (R, C), (F, R, C) or (R, C, 3) / (F, R, C, 3)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    sop_uid = attrs.pop("SOPInstanceUID", None) or generate_uid()
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyInstanceUID = attrs.pop("StudyInstanceUID", None) or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = attrs.pop("Modality", "CT")
    ds.Manufacturer = attrs.pop("Manufacturer", "TestVendor")
    if pixels is not None:
        arr = np.asarray(pixels)
        colour = photometric.startswith("RGB")
        frames = arr.shape[0] if arr.ndim == (4 if colour else 3) else 1
        rows, cols = arr.shape[-3:-1] if colour else arr.shape[-2:]
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = int(rows), int(cols)
        if frames > 1:
            ds.NumberOfFrames = frames
        bits = arr.dtype.itemsize * 8
        ds.BitsAllocated = bits
        ds.BitsStored = attrs.pop("BitsStored", bits)
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
        ds.PixelData = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read(ds: Dataset, **prep: Any) -> np.ndarray:
    return read_dicom(to_bytes(ds), Preprocessing(**prep)).pixels


# ------------------------------------------------------------------ physical values


def test_ct_rescale_then_file_window_in_hounsfield_units() -> None:
    # Prepare: stored 0, 1024, 1064, 2000 -> HU -1024, 0, 40, 976 (slope 1, intercept -1024)
    stored = np.array([[0, 1024, 1064, 2000]] * 4, dtype=np.int16)
    ds = make_dataset(
        stored,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
        BitsStored=12,
    )
    # Execute
    out = read(ds, size=4)
    # Assert: PS3.3 C.11.2.1.2.1 LINEAR: (x - (c - 0.5)) / (w - 1) + 0.5, clipped
    expected = [0.0, (0 - 39.5) / 399 + 0.5, (40 - 39.5) / 399 + 0.5, 1.0]
    assert out.shape == (1, 1, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], expected, atol=1e-6)


def test_named_window_overrides_the_file_window() -> None:
    stored = np.full((4, 4), 1024, dtype=np.int16)  # 0 HU
    ds = make_dataset(
        stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
    )
    out = read_dicom(to_bytes(ds), Preprocessing.with_window("lung", size=4)).pixels
    # lung: c=-600, w=1500 -> (0 + 600.5) / 1499 + 0.5
    np.testing.assert_allclose(out, (600.5 / 1499 + 0.5), atol=1e-6)


def test_monochrome1_is_inverted() -> None:
    stored = np.tile(np.array([0, 51, 204, 255], dtype=np.uint8), (4, 1))
    ds = make_dataset(stored, photometric="MONOCHROME1", Modality="CR")
    out = read(ds, size=4)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 0.8, 0.2, 0.0], atol=1e-6)


def test_uint8_without_luts_is_exactly_value_over_255() -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    stored[0, :2] = (0, 255)
    ds = make_dataset(stored, sop_class=SecondaryCaptureImageStorage, Modality="CR")
    out = read(ds, size=28)
    assert np.array_equal(out[0, 0], stored.astype(np.float32) / 255)


def test_all_256_uint8_values_round_trip_exactly() -> None:
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = make_dataset(stored, sop_class=SecondaryCaptureImageStorage)
    assert np.array_equal(read(ds, size=16)[0, 0], stored.astype(np.float32) / 255)


def test_16bit_without_window_uses_per_image_minmax_in_auto_mode() -> None:
    stored = np.array([[100, 200], [300, 500]], dtype=np.uint16).repeat(2, 0).repeat(2, 1)
    ds = make_dataset(stored, Modality="MR", BitsStored=12)
    out = read(ds, size=4)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out[0, 0, 0, 2], 0.25, atol=1e-6)  # (200-100)/(500-100)


def test_multiframe_gives_one_sample_per_frame_or_the_middle_one() -> None:
    stored = np.stack([np.full((8, 8), v, dtype=np.uint8) for v in (0, 51, 255)])
    ds = make_dataset(stored, sop_class=SecondaryCaptureImageStorage)
    assert read(ds, size=8).shape == (3, 1, 8, 8)
    middle = read(ds, size=8, frames="middle")
    assert middle.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(middle, 0.2, atol=1e-6)


def test_rgb_becomes_bt601_luma_or_stays_rgb() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    ds = make_dataset(rgb, sop_class=SecondaryCaptureImageStorage, photometric="RGB")
    np.testing.assert_allclose(read(ds, size=4), 0.299, atol=1e-6)
    out3 = read(ds, size=4, channels=3)
    assert out3.shape == (1, 3, 4, 4)
    np.testing.assert_allclose(out3[0, :, 0, 0], [1.0, 0.0, 0.0], atol=1e-6)


def test_resize_to_size_stays_in_unit_range() -> None:
    stored = np.random.default_rng(1).integers(0, 4096, size=(64, 48), dtype=np.uint16)
    ds = make_dataset(stored, BitsStored=12, WindowCenter=2048, WindowWidth=4096)
    out = read(ds, size=16)
    assert out.shape == (1, 1, 16, 16)
    assert out.min() >= 0.0 and out.max() <= 1.0


# ---------------------------------------------------------------- parsing / reasons


def reason_of(data: bytes) -> Reason:
    with pytest.raises(UnusableInputError) as info:
        read_dicom(data, Preprocessing())
    return info.value.reason


def test_text_file_is_not_dicom() -> None:
    assert reason_of(b"BSD 2-Clause License\n" * 20) is Reason.NOT_DICOM


def test_non_image_sop_class_is_quarantined() -> None:
    ds = make_dataset(None, sop_class=BasicTextSRStorage, Modality="SR")
    assert reason_of(to_bytes(ds)) is Reason.NON_IMAGE_SOP_CLASS


def test_dicomdir_is_recognised() -> None:
    ds = make_dataset(None, sop_class=MediaStorageDirectoryStorage)
    assert reason_of(to_bytes(ds)) is Reason.DICOMDIR


def test_image_sop_class_without_pixels() -> None:
    assert reason_of(to_bytes(make_dataset(None))) is Reason.NO_PIXEL_DATA


def test_short_pixel_data_is_truncated_pixel_data() -> None:
    ds = make_dataset(np.zeros((8, 8), dtype=np.uint16))
    ds.PixelData = ds.PixelData[:64]
    assert reason_of(to_bytes(ds)) is Reason.TRUNCATED_PIXEL_DATA


def test_missing_bits_allocated() -> None:
    ds = make_dataset(np.zeros((8, 8), dtype=np.uint8))
    del ds.BitsAllocated
    ds["PixelData"].VR = "OB"  # otherwise the writer needs Bits Allocated to pick OB/OW
    assert reason_of(to_bytes(ds)) is Reason.MISSING_PIXEL_ATTRIBUTES


def test_invalid_numeric_string_is_malformed_header() -> None:
    ds = make_dataset(np.zeros((8, 8), dtype=np.uint8))
    ds.NumberOfFrames = "1"
    data = to_bytes(ds)
    # Patch the raw IS value the way badVR.dcm has it: "1A" as Number of Frames.
    patched = data.replace(b"IS\x02\x001 ", b"IS\x02\x001A")
    assert patched != data
    assert reason_of(patched) is Reason.MALFORMED_HEADER


def test_dataset_without_preamble_parses(tmp_path: Path) -> None:
    ds = make_dataset(np.zeros((8, 8), dtype=np.uint8))
    bare = to_bytes(ds)[132:]  # file meta + data set, no preamble / DICM
    assert parse_dataset(bare).Modality == "CT"
    assert read_dicom(bare, Preprocessing(size=8)).pixels.shape == (1, 1, 8, 8)


def test_gzip_and_extensionless_files_are_found_by_content(tmp_path: Path) -> None:
    ds = make_dataset(np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "IM0001").write_bytes(to_bytes(ds))
    (tmp_path / "scan.gz").write_bytes(gzip.compress(to_bytes(ds)))
    (tmp_path / ".hidden").write_bytes(b"x")
    files = discover_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a/b/IM0001", "scan.gz"]
    for p in files:
        assert read_dicom(load_bytes(p), Preprocessing(size=8)).pixels.shape == (1, 1, 8, 8)


def test_corrupt_gzip(tmp_path: Path) -> None:
    p = tmp_path / "bad.gz"
    p.write_bytes(b"\x1f\x8b" + b"\x00" * 50)
    with pytest.raises(UnusableInputError) as info:
        load_bytes(p)
    assert info.value.reason is Reason.CORRUPT_GZIP


def test_errors_never_quote_header_values() -> None:
    ds = make_dataset(None, sop_class=BasicTextSRStorage, PatientName="DOE^JANE")
    with pytest.raises(UnusableInputError) as info:
        read_dicom(to_bytes(ds), Preprocessing())
    assert "DOE" not in str(info.value)


# ------------------------------------------------------------------- preprocessing


def test_preprocessing_validation_names_the_parameter() -> None:
    with pytest.raises(ConfigError, match="size"):
        Preprocessing(size=2)
    with pytest.raises(ConfigError, match="channels"):
        Preprocessing(channels=2)
    with pytest.raises(ConfigError, match="Did you mean 'lung'"):
        Preprocessing.with_window("lungg")
    assert Preprocessing.with_window("-600,1500").window == (-600.0, 1500.0)


def test_preprocessing_manifest_is_json_ready() -> None:
    import json

    m = Preprocessing.with_window("bone", size=32).to_manifest()
    assert json.loads(json.dumps(m))["window"] == [400.0, 1800.0]
    assert any("C.11.1" in step for step in m["steps"])
