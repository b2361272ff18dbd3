"""Find, read and decode DICOM files, and turn stored pixel values into model inputs.

This module is the lowest layer of the hospital data path (DESIGN section 3). It imports
neither torch nor flwr, so a hospital can run ingestion on a minimal install. Nothing here
logs or raises with a header value or a file name in the message: callers get a
machine-readable :class:`Reason` code instead.

Pipeline for one file (:func:`read_dicom`):

1. bytes, gunzipped when the content starts with the gzip magic (not by extension);
2. parse with pydicom: a DICM preamble, or (without one) a data set whose first element is
   in group 0002 or 0008, as written by some old systems;
3. reject what is not an image: DICOMDIR, non-image SOP classes (RT Plan, SR, ECG waveform,
   segmentation, dose grid, ...), no pixel data, unsupported transfer syntax;
4. decode with pydicom's pixel backends (numpy, pylibjpeg + openjpeg/libjpeg, gdcm), so
   RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 and HTJ2K decode;
5. stored values to physical values with the Modality LUT / rescale (PS3.3 C.11.1; CT in
   Hounsfield units); every frame resized to ``(size, size)`` (linear, so it commutes
   with the rescale; skipped when the size already matches); then the VOI LUT or window
   (PS3.3 C.11.2) or a named window, and scaling to ``[0, 1]``; MONOCHROME1 is inverted
   (PS3.3 C.7.6.3.1.2) so that higher is always brighter; palette colour through its LUT
   (PS3.3 C.7.6.3.1.5); colour to grey by ITU-R BT.601 luma when one channel is asked for.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import logging
import os
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from common.errors import ConfigError

__all__ = [
    "NAMED_WINDOWS",
    "REASON_HELP",
    "DicomImage",
    "Preprocessing",
    "Reason",
    "UnusableInputError",
    "discover_files",
    "load_bytes",
    "parse_dataset",
    "quiet_pydicom_logs",
    "read_dicom",
    "to_model_input",
]

#: Bumped whenever the pixel pipeline changes, so cached results are not reused.
PIPELINE_VERSION = "1"

#: Largest gunzipped file accepted (bytes); guards against decompression bombs.
MAX_GUNZIP_BYTES = 2 * 1024**3

#: Named windows ``name -> (center, width)`` in Hounsfield units for CT
#: (common radiology presets; e.g. Radiopaedia "Windowing (CT)").
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
}

_INTENSITY_MODES = ("auto", "voi", "stored-range", "minmax")
_FRAME_MODES = ("all", "middle")
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_GZIP_MAGIC = b"\x1f\x8b"


class Reason(StrEnum):
    """Machine-readable reason a file was quarantined (written to the manifest)."""

    UNREADABLE = "unreadable"
    CORRUPT_GZIP = "corrupt_gzip"
    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    MALFORMED_HEADER = "malformed_header"
    DICOMDIR = "dicomdir"
    NON_IMAGE_SOP_CLASS = "non_image_sop_class"
    NO_PIXEL_DATA = "no_pixel_data"
    MISSING_TRANSFER_SYNTAX = "missing_transfer_syntax"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    MISSING_PIXEL_ATTRIBUTES = "missing_pixel_attributes"
    TRUNCATED_PIXEL_DATA = "truncated_pixel_data"
    UNDECODABLE_PIXEL_DATA = "undecodable_pixel_data"
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric_interpretation"
    UNLABELLED = "unlabelled"
    DUPLICATE = "duplicate"
    UNEXPECTED_ERROR = "unexpected_error"


#: One sentence per reason, for ``--help`` texts and summary tables.
REASON_HELP: dict[Reason, str] = {
    Reason.UNREADABLE: "the file could not be read from disk (permissions, I/O error)",
    Reason.CORRUPT_GZIP: "gzip magic bytes but the stream does not decompress",
    Reason.NOT_DICOM: "no DICM preamble and the content does not parse as a DICOM data set",
    Reason.TRUNCATED: "the file ends in the middle of the header",
    Reason.MALFORMED_HEADER: "a header element has an invalid value or structure",
    Reason.DICOMDIR: "a DICOMDIR index (its referenced images are found by the walk)",
    Reason.NON_IMAGE_SOP_CLASS: (
        "not an image SOP class (RT Plan/Dose/Structure Set, SR, waveform, segmentation, "
        "parametric map, colour palette, ...)"
    ),
    Reason.NO_PIXEL_DATA: "an image SOP class (or none) but no Pixel Data element",
    Reason.MISSING_TRANSFER_SYNTAX: "no Transfer Syntax UID, so pixel data cannot be decoded",
    Reason.UNSUPPORTED_TRANSFER_SYNTAX: "no installed pixel decoder handles the transfer syntax",
    Reason.MISSING_PIXEL_ATTRIBUTES: "Image Pixel module attributes (e.g. Bits Allocated) missing",
    Reason.TRUNCATED_PIXEL_DATA: "Pixel Data is shorter than Rows x Columns x frames needs",
    Reason.UNDECODABLE_PIXEL_DATA: "every available decoder failed on the compressed stream",
    Reason.UNSUPPORTED_PHOTOMETRIC: "a Photometric Interpretation this pipeline cannot map to grey",
    Reason.UNLABELLED: "no row of the labels CSV matches the file",
    Reason.DUPLICATE: "byte-identical to a file already ingested",
    Reason.UNEXPECTED_ERROR: "an unexpected error (the exception type is recorded)",
}


class UnusableInputError(Exception):
    """A file cannot be used; carries a :class:`Reason`, never a header value or path.

    Parameters
    ----------
    reason : Reason
        Why the file is unusable.
    detail : str
        Non-identifying detail, e.g. an exception type name or a SOP class name from the
        DICOM dictionary (never a value read from the file that is not a dictionary term).

    """

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(reason.value if not detail else f"{reason.value} ({detail})")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How stored pixel values become model inputs; recorded in the manifest.

    Parameters
    ----------
    size : int
        Output height and width in pixels (square); frames of another size are resampled
        bilinearly with antialiasing (Pillow), frames of this size are not touched.
    channels : int
        1 (grey; colour converted by BT.601 luma) or 3 (grey replicated).
    intensity : str
        How values become ``[0, 1]`` for greyscale images:

        - ``"auto"``: the file's VOI LUT or window (PS3.3 C.11.2) if present; else the
          full stored range when Bits Stored <= 8; else per-image min-max.
        - ``"voi"``: the file's VOI LUT or window; full stored range when none.
        - ``"stored-range"``: the stored range (2**BitsStored values) through the
          Modality LUT, ignoring any window.
        - ``"minmax"``: per-image minimum and maximum of the modality values.
    window : tuple of float, optional
        ``(center, width)`` applied to every greyscale image after the Modality LUT
        (so in HU for CT), overriding ``intensity``; see :data:`NAMED_WINDOWS`.
    window_name : str, optional
        The preset ``window`` came from (recorded only).
    frames : str
        ``"all"`` (every frame of a multi-frame file is one sample of the same patient)
        or ``"middle"`` (only the middle frame).

    Raises
    ------
    ConfigError
        On a value outside the allowed set.

    """

    size: int = 28
    channels: int = 1
    intensity: str = "auto"
    window: tuple[float, float] | None = None
    window_name: str | None = None
    frames: str = "all"
    version: str = field(default=PIPELINE_VERSION)

    def __post_init__(self) -> None:
        if not 4 <= self.size <= 4096:
            raise ConfigError(f"size={self.size} must be between 4 and 4096 pixels")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels={self.channels} must be 1 (grey) or 3 (RGB)")
        if self.intensity not in _INTENSITY_MODES:
            raise ConfigError(f"intensity={self.intensity!r} must be one of {_INTENSITY_MODES}")
        if self.frames not in _FRAME_MODES:
            raise ConfigError(f"frames={self.frames!r} must be one of {_FRAME_MODES}")
        if self.window is not None and not self.window[1] > 0:
            raise ConfigError(f"window width {self.window[1]} must be > 0")

    @classmethod
    def with_window(cls, spec: str | None, **kwargs: Any) -> Preprocessing:
        """Build from a window spec: a :data:`NAMED_WINDOWS` name or ``"CENTER,WIDTH"``.

        Raises
        ------
        ConfigError
            If ``spec`` is neither a known name nor two numbers.

        """
        if not spec:
            return cls(**kwargs)
        key = spec.strip().lower()
        if key in NAMED_WINDOWS:
            return cls(window=NAMED_WINDOWS[key], window_name=key, **kwargs)
        try:
            center, width = (float(v) for v in key.split(","))
        except ValueError:
            from common.errors import did_you_mean

            raise ConfigError(
                f"window {spec!r} is neither a preset {sorted(NAMED_WINDOWS)} nor "
                f"'CENTER,WIDTH' (e.g. '-600,1500').{did_you_mean(key, NAMED_WINDOWS)}"
            ) from None
        return cls(window=(center, width), window_name="custom", **kwargs)

    def to_manifest(self) -> dict[str, Any]:
        """JSON-serialisable description, including the standards each step follows."""
        out = asdict(self)
        out["window"] = list(self.window) if self.window else None
        out["steps"] = [
            "decode: pydicom pixel backends (numpy, pylibjpeg, openjpeg, libjpeg, gdcm)",
            "palette colour: PS3.3 C.7.6.3.1.5 (pydicom apply_color_lut)",
            "modality LUT / rescale: PS3.3 C.11.1 (pydicom apply_modality_lut; CT in HU)",
            f"resize physical values to {self.size}x{self.size}: Pillow bilinear "
            "(antialiased), skipped when the frame already has that size",
            "VOI LUT / window: PS3.3 C.11.2 (pydicom apply_voi_lut / apply_windowing)",
            "scale to [0, 1] by the VOI output range, stored range or min-max (see intensity)",
            "MONOCHROME1 inverted: x -> 1 - x (PS3.3 C.7.6.3.1.2)",
            "colour: scaled by the stored range; with channels=1 converted to grey by "
            "ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B before resizing, else each "
            "channel resized",
        ]
        out["dtype"] = "float32"
        out["layout"] = "(N, C, H, W)"
        return out


@dataclass
class DicomImage:
    """A decoded, preprocessed DICOM image and its non-pixel facts.

    Attributes
    ----------
    pixels : numpy.ndarray
        float32 ``(F, C, size, size)`` in ``[0, 1]``; ``F`` frames used.
    modality, manufacturer, sop_class, transfer_syntax, photometric : str
        Dictionary terms / equipment names for summary counts ("" when absent).
    identifiers : dict[str, str]
        Raw ``sop_instance_uid``, ``study_instance_uid``, ``accession_number``,
        ``patient_id`` values. Identifying: the caller must hash them at once and never
        log, store or print them.

    """

    pixels: np.ndarray
    modality: str
    manufacturer: str
    sop_class: str
    transfer_syntax: str
    photometric: str
    identifiers: dict[str, str]


# ----------------------------------------------------------------- pydicom log guard


@contextlib.contextmanager
def quiet_pydicom_logs() -> Iterator[None]:
    """Keep pydicom's log records (which may quote header values, i.e. PHI) from handlers.

    pydicom logs validation problems through the ``pydicom`` logger tree, often with the
    offending value (e.g. ``Invalid value for VR UI: '1.2.3...'``). Inside this context
    those records stop at the ``pydicom`` logger; medfed reports a reason code instead.
    Worker processes forked inside the context inherit it.
    """
    logger = logging.getLogger("pydicom")
    handler = logging.NullHandler()
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = saved
        logger.removeHandler(handler)


# ------------------------------------------------------------------------- discovery


def discover_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every regular file under ``root``, recursively, in a stable (sorted) order.

    Files are not filtered by extension: DICOM exports often have none, or ``.gz``. Which
    ones are DICOM is decided by content in :func:`parse_dataset`. Hidden files and
    directories (name starting with ``.``) and symbolic links are skipped.

    Returns
    -------
    list of pathlib.Path
        Sorted by their path relative to ``root``.

    """
    base = Path(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and p.is_file() and not p.is_symlink():
                found.append(p)
    return sorted(found, key=lambda p: p.relative_to(base).as_posix())


def load_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a file, gunzipping it when its content starts with the gzip magic bytes.

    Raises
    ------
    UnusableInputError
        ``unreadable`` on an OS error, ``corrupt_gzip`` when decompression fails or the
        result exceeds :data:`MAX_GUNZIP_BYTES`.

    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnusableInputError(Reason.UNREADABLE, type(exc).__name__) from None
    return gunzip_if_needed(data)


def gunzip_if_needed(data: bytes) -> bytes:
    """Return ``data``, decompressed if it is a gzip stream (RFC 1952 magic ``1f 8b``)."""
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
            out = gz.read(MAX_GUNZIP_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise UnusableInputError(Reason.CORRUPT_GZIP, type(exc).__name__) from None
    if len(out) > MAX_GUNZIP_BYTES:
        raise UnusableInputError(Reason.CORRUPT_GZIP, "decompressed size over limit")
    return out


# --------------------------------------------------------------------------- parsing


def _looks_like_dataset(ds: Dataset) -> bool:
    """Plausibility of a data set read without a preamble (``force=True``).

    pydicom will "parse" any bytes when forced (a text file becomes one junk element).
    A real data set without preamble starts with group 0002 (file meta) or 0008
    (identifying group, PS3.3 C.12.1) and has more than two elements.
    """
    tags = list(ds.keys())
    meta = list(getattr(ds, "file_meta", {}).keys())
    first = meta[0] if meta else (tags[0] if tags else None)
    return first is not None and first.group in (0x0002, 0x0008) and len(tags) + len(meta) > 2


def parse_dataset(data: bytes) -> Dataset:
    """Parse DICOM bytes (Part 10 file, or a bare data set without preamble).

    Raises
    ------
    UnusableInputError
        ``not_dicom``, ``truncated`` or ``malformed_header``.

    """
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        with warnings.catch_warnings(record=True) as caught:
            # Recorded, not shown: pydicom's warnings may quote header values (PHI).
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except (EOFError, BufferError) as exc:
        raise UnusableInputError(Reason.TRUNCATED, type(exc).__name__) from None
    except InvalidDicomError:
        raise UnusableInputError(Reason.NOT_DICOM) from None
    except Exception as exc:  # pydicom raises many types on malformed headers
        reason = Reason.NOT_DICOM if not has_preamble else Reason.MALFORMED_HEADER
        raise UnusableInputError(reason, type(exc).__name__) from None
    if not has_preamble and not _looks_like_dataset(ds):
        raise UnusableInputError(Reason.NOT_DICOM)
    if any("End of file reached" in str(w.message) for w in caught):
        raise UnusableInputError(Reason.TRUNCATED, "end of file inside a sequence")
    return ds


_NUMERIC_KEYWORDS = (
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
)


def check_header_values(ds: Dataset) -> None:
    """Convert the numeric strings the pixel pipeline uses; reject those that do not parse.

    pydicom only warns on an invalid IS/DS value (e.g. ``"1A"`` as Number of Frames) and
    keeps the string, which later breaks frame counts or rescale; such a file is
    ``malformed_header``. Checked: Number of Frames, Rescale Slope/Intercept, Window
    Center/Width (PS3.3 C.7.6.6, C.11.1, C.11.2).

    Raises
    ------
    UnusableInputError
        ``malformed_header`` or ``truncated``.

    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for kw in _NUMERIC_KEYWORDS:
                if kw in ds:
                    _ = ds[kw].value
    except (EOFError, BufferError) as exc:
        raise UnusableInputError(Reason.TRUNCATED, type(exc).__name__) from None
    except Exception as exc:
        raise UnusableInputError(Reason.MALFORMED_HEADER, type(exc).__name__) from None
    for w in caught:
        msg = str(w.message)
        if "Invalid value for VR IS" in msg or "Invalid value for VR DS" in msg:
            raise UnusableInputError(Reason.MALFORMED_HEADER, "invalid IS/DS value")


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    if value is None:
        return ""
    return str(value).strip()


def _sop_class(ds: Dataset) -> UID | None:
    uid = ds.get("SOPClassUID", None)
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = meta.get("MediaStorageSOPClassUID", None) if meta is not None else None
    return UID(str(uid)) if uid else None


def _is_image_sop_class(uid: UID) -> bool | None:
    """Return ``True`` for a known image storage class, ``False`` for a non-image one.

    Image storage classes are those whose PS3.6 name contains "Image Storage" (CT, MR,
    CR, DX, MG, US, NM, PET, XA, Secondary Capture, Enhanced/Legacy multi-frame, VL...);
    ``None`` when the UID is not in pydicom's dictionary (decided by Pixel Data then).
    """
    name = uid.name
    if name == str(uid):
        return None
    return "Image Storage" in name


def _check_usable(ds: Dataset) -> None:
    """Reject DICOMDIRs, non-image SOP classes, files without pixels or decoder."""
    sop = _sop_class(ds)
    if sop == _DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
        raise UnusableInputError(Reason.DICOMDIR)
    if sop is not None and _is_image_sop_class(sop) is False:
        raise UnusableInputError(Reason.NON_IMAGE_SOP_CLASS, sop.name)
    if "PixelData" not in ds:
        raise UnusableInputError(Reason.NO_PIXEL_DATA)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID", None) if meta is not None else None
    if not ts:
        raise UnusableInputError(Reason.MISSING_TRANSFER_SYNTAX)
    try:
        decoder = get_decoder(UID(str(ts)))
    except NotImplementedError:
        uid = UID(str(ts))
        name = uid.name if uid.name != str(uid) else "unknown transfer syntax"
        raise UnusableInputError(Reason.UNSUPPORTED_TRANSFER_SYNTAX, name) from None
    if not decoder.is_available:
        raise UnusableInputError(Reason.UNSUPPORTED_TRANSFER_SYNTAX, "no decoder plugin installed")


def _decode(ds: Dataset) -> np.ndarray:
    """Decode stored values, ``(F, R, C)`` or ``(F, R, C, S)``; YBR becomes RGB."""
    try:
        arr = ds.pixel_array
    except AttributeError as exc:
        msg = str(exc)
        if "Transfer Syntax" in msg or "file_meta" in msg:
            raise UnusableInputError(Reason.MISSING_TRANSFER_SYNTAX) from None
        raise UnusableInputError(Reason.MISSING_PIXEL_ATTRIBUTES, type(exc).__name__) from None
    except NotImplementedError as exc:
        raise UnusableInputError(Reason.UNSUPPORTED_TRANSFER_SYNTAX, type(exc).__name__) from None
    except ValueError as exc:
        if "less than expected" in str(exc):
            raise UnusableInputError(Reason.TRUNCATED_PIXEL_DATA) from None
        raise UnusableInputError(Reason.UNDECODABLE_PIXEL_DATA, type(exc).__name__) from None
    except (EOFError, BufferError):
        raise UnusableInputError(Reason.TRUNCATED_PIXEL_DATA) from None
    except Exception as exc:
        raise UnusableInputError(Reason.UNDECODABLE_PIXEL_DATA, type(exc).__name__) from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if n_frames == 1:
        arr = arr[np.newaxis]
    if arr.ndim != (4 if samples > 1 else 3):
        raise UnusableInputError(Reason.MISSING_PIXEL_ATTRIBUTES, f"array rank {arr.ndim}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.asarray(arr)


# -------------------------------------------------------------- physical values (grey)

_LUT_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "BitsAllocated",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)


def _lut_source(ds: Dataset) -> Dataset:
    """Return a small data set with the LUT attributes pydicom's LUT functions read.

    Enhanced (multi-frame) IODs keep rescale and window in the Shared Functional Groups
    (PS3.3 C.7.6.16: Pixel Value Transformation, Frame VOI LUT); they are lifted to the
    top level when absent there. Working on a copy also keeps the LUT functions from
    mutating the parsed data set.
    """
    src = Dataset()
    for kw in _LUT_KEYWORDS:
        if kw in ds:
            src.add(copy.copy(ds[kw]))  # a shallow copy: no re-validation, no aliasing
    if hasattr(ds, "file_meta"):
        src.file_meta = ds.file_meta
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    groups = [shared[0]] if shared else []
    if per_frame:
        groups.append(per_frame[0])
    for group in groups:
        for seq_kw, kws in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            seq = group.get(seq_kw)
            if seq:
                for kw in kws:
                    if kw not in src and kw in seq[0]:
                        src.add(copy.copy(seq[0][kw]))
    return src


def _stored_range(src: Dataset) -> tuple[float, float]:
    bits = int(src.get("BitsStored", 0) or src.get("BitsAllocated", 16) or 16)
    if int(src.get("PixelRepresentation", 0) or 0):
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def _has_voi(src: Dataset) -> bool:
    seq = src.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return True
    return src.get("WindowCenter") is not None and src.get("WindowWidth") is not None


def _voi_output_range(src: Dataset, lo_hi_modality: tuple[float, float]) -> tuple[float, float]:
    """Output range of :func:`pydicom.pixels.apply_voi_lut` (see its implementation)."""
    seq = src.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
    if src.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(src.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    return lo_hi_modality


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(arr - lo) / (hi - lo)`` clipped to ``[0, 1]``, computed in float32.

    float32 division makes 8-bit data exactly ``uint8 / 255`` (what training on the
    original arrays uses) when ``lo, hi = 0, 255``.
    """
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    out = np.asarray(arr, dtype=np.float32)
    out = out - np.float32(lo) if lo else out.copy() if out is arr else out
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(F, R, C)`` frames to float32 ``(F, size, size)``; no-op when equal.

    Pillow ``BILINEAR`` on mode ``F`` (32-bit float) antialiases when downsampling
    (its filter support grows with the scale factor).
    """
    f, h, w = frames.shape
    if (h, w) == (size, size):
        return np.asarray(frames, dtype=np.float32)
    from PIL import Image

    out = np.empty((f, size, size), dtype=np.float32)
    for i in range(f):
        img = Image.fromarray(np.ascontiguousarray(frames[i], dtype=np.float32), mode="F")
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    return out


def _grey_to_unit(stored: np.ndarray, ds: Dataset, prep: Preprocessing) -> np.ndarray:
    """Greyscale stored values ``(F, R, C)`` to float32 ``(F, size, size)`` in ``[0, 1]``.

    Order: Modality LUT, resize, VOI LUT / window on the resized physical values, scale,
    MONOCHROME1 inversion. A linear rescale (slope/intercept) commutes with the linear
    resize, so it is applied after resizing; a Modality LUT Sequence (non-linear) is
    applied before. Working on the resized frames costs ``size**2`` instead of
    ``R * C`` per frame.
    """
    src = _lut_source(ds)
    if src.get("ModalityLUTSequence"):
        modality = _resize(apply_modality_lut(stored, src), prep.size)
    else:
        modality = np.asarray(apply_modality_lut(_resize(stored, prep.size), src), np.float32)
    smin, smax = _stored_range(src)
    mod_range = apply_modality_lut(np.array([smin, smax], dtype=np.int64), src)
    lo_m, hi_m = float(np.min(mod_range)), float(np.max(mod_range))
    src.PhotometricInterpretation = "MONOCHROME2"  # windowing only checks it is MONOCHROME
    if "BitsStored" not in src:
        src.BitsStored = int(src.get("BitsAllocated", 16) or 16)
    if "PixelRepresentation" not in src:
        src.PixelRepresentation = 0

    if prep.window is not None:
        win = Dataset()
        for kw in ("BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept"):
            if kw in src:
                setattr(win, kw, src[kw].value)
        if "ModalityLUTSequence" in src:
            win.ModalityLUTSequence = src.ModalityLUTSequence
        win.PhotometricInterpretation = "MONOCHROME2"
        win.WindowCenter, win.WindowWidth = prep.window
        unit = _scale(apply_voi_lut(modality, win), *_voi_output_range(win, (lo_m, hi_m)))
    elif prep.intensity in ("auto", "voi") and _has_voi(src):
        seq = src.get("VOILUTSequence")
        # A VOI LUT Sequence indexes by integer input values (PS3.3 C.11.2.1.1).
        values = np.rint(modality).astype(np.int64) if seq else modality
        unit = _scale(apply_voi_lut(values, src), *_voi_output_range(src, (lo_m, hi_m)))
    elif prep.intensity == "minmax" or (prep.intensity == "auto" and src.BitsStored > 8):
        lo = modality.min(axis=(1, 2), keepdims=True)
        hi = modality.max(axis=(1, 2), keepdims=True)
        span = np.where(hi > lo, hi - lo, np.float32(1.0))
        unit = np.clip((modality - lo) / span, 0.0, 1.0).astype(np.float32)
    else:
        unit = _scale(modality, lo_m, hi_m)
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        unit = (1.0 - unit).astype(np.float32)
    return unit


def _colour_to_unit(
    rgb: np.ndarray, lo: float, hi: float, *, size: int, channels: int
) -> np.ndarray:
    """RGB values ``(F, R, C, 3)`` to float32 in ``[0, 1]``, resized.

    Returns ``(F, size, size)`` luma (ITU-R BT.601) when ``channels == 1`` (computed
    before resizing: both are linear) or ``(F, 3, size, size)`` otherwise.
    """
    if channels == 1:
        # Luma weights sum to 1, so luma, resize and scaling commute: do them small.
        r, g, b = (rgb[..., k].astype(np.float32) for k in range(3))
        luma = np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b
        return _scale(_resize(luma, size), lo, hi)
    unit = _scale(rgb, lo, hi)
    f = unit.shape[0]
    chans = np.moveaxis(unit, -1, 1).reshape(f * 3, unit.shape[1], unit.shape[2])
    return _resize(chans, size).reshape(f, 3, size, size)


def to_model_input(frames: np.ndarray, *, channels: int) -> np.ndarray:
    """Arrange ``[0, 1]`` frames as ``(F, channels, H, W)`` for the model.

    Parameters
    ----------
    frames : numpy.ndarray
        float32 ``(F, H, W)`` (grey or luma) or ``(F, 3, H, W)`` (RGB) in ``[0, 1]``.
    channels : int
        1 or 3 (grey is replicated to 3).

    Returns
    -------
    numpy.ndarray
        float32 ``(F, channels, H, W)`` in ``[0, 1]``.

    """
    chw = frames[:, np.newaxis] if frames.ndim == 3 else frames
    if chw.shape[1] != channels:
        chw = np.repeat(chw, channels, axis=1)
    out: np.ndarray = np.clip(chw, 0.0, 1.0).astype(np.float32, copy=False)
    return out


def _select_frames(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode == "middle" and arr.shape[0] > 1:
        mid = arr.shape[0] // 2
        return arr[mid : mid + 1]
    return arr


def dataset_facts(ds: Dataset) -> dict[str, str]:
    """Non-identifying facts for summary counts: modality, manufacturer, SOP class, TS."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID", None) if meta is not None else None
    sop = _sop_class(ds)
    return {
        "modality": _text(ds, "Modality"),
        "manufacturer": _text(ds, "Manufacturer"),
        "sop_class": sop.name if sop else "",
        "transfer_syntax": UID(str(ts)).name if ts else "",
    }


def dataset_identifiers(ds: Dataset) -> dict[str, str]:
    """Raw identifiers used as label keys and patient groups (hash them at once)."""
    return {
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "accession_number": _text(ds, "AccessionNumber"),
        "patient_id": _text(ds, "PatientID"),
    }


def read_dicom(data: bytes, prep: Preprocessing, *, ds: Dataset | None = None) -> DicomImage:
    """Parse, check, decode and preprocess one DICOM file's bytes.

    Parameters
    ----------
    data : bytes
        File content (already gunzipped; see :func:`load_bytes`).
    prep : Preprocessing
        Output size, channels, intensity mapping and frame selection.
    ds : pydicom.dataset.Dataset, optional
        The already-parsed data set of ``data`` (saves a second parse).

    Returns
    -------
    DicomImage
        ``pixels`` float32 ``(F, C, size, size)`` in ``[0, 1]``.

    Raises
    ------
    UnusableInputError
        With the :class:`Reason` the file cannot be used. Never any other exception
        type for bad input; the message holds no header value.

    """
    with warnings.catch_warnings():
        # pydicom's validation warnings quote header values, which may be PHI.
        warnings.simplefilter("ignore")
        if ds is None:
            ds = parse_dataset(data)
        check_header_values(ds)
        try:
            facts = dataset_facts(ds)
            ids = dataset_identifiers(ds)
            _check_usable(ds)
            photometric = _text(ds, "PhotometricInterpretation").upper()
        except UnusableInputError:
            raise
        except (EOFError, BufferError) as exc:
            raise UnusableInputError(Reason.TRUNCATED, type(exc).__name__) from None
        except Exception as exc:  # invalid values surface on first access (e.g. bad IS)
            raise UnusableInputError(Reason.MALFORMED_HEADER, type(exc).__name__) from None
        stored = _select_frames(_decode(ds), prep.frames)
        try:
            if photometric in ("MONOCHROME1", "MONOCHROME2"):
                unit = _grey_to_unit(stored, ds, prep)
            elif photometric == "PALETTE COLOR":
                rgb = apply_color_lut(stored, ds)
                bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
                hi = float(2 ** (16 if bits > 8 else 8) - 1)
                unit = _colour_to_unit(rgb, 0.0, hi, size=prep.size, channels=prep.channels)
            elif stored.ndim == 4 and stored.shape[-1] == 3:
                # RGB, or YBR_* already converted to RGB by pydicom's decoders.
                lo, hi = _stored_range(_lut_source(ds))
                unit = _colour_to_unit(stored, lo, hi, size=prep.size, channels=prep.channels)
            else:
                raise UnusableInputError(Reason.UNSUPPORTED_PHOTOMETRIC)
        except UnusableInputError:
            raise
        except Exception as exc:
            raise UnusableInputError(Reason.UNDECODABLE_PIXEL_DATA, type(exc).__name__) from None
    pixels = to_model_input(unit, channels=prep.channels)
    return DicomImage(
        pixels=pixels,
        photometric=photometric,
        identifiers=ids,
        **facts,
    )


def salted_hash(value: str, salt: bytes) -> str:
    """Hex SHA-256 of ``salt || value`` (empty string for an empty value)."""
    if not value:
        return ""
    return hashlib.sha256(salt + value.encode("utf-8", "surrogateescape")).hexdigest()
