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
4. reject, from header values alone and before any pixel is decoded, a file whose declared
   decoded pixel data is over the per-file byte budget (:class:`ByteBudget`), and a
   greyscale file whose LUT parameters (rescale slope/intercept, window centre/width, LUT
   descriptors) are not finite or out of a sane range (:func:`check_lut_values`);
5. decode with pydicom's pixel backends (numpy, its RLE decoder, pylibjpeg +
   openjpeg/libjpeg, Pillow; never GDCM, see :data:`DECODING_PLUGINS`), so RLE, JPEG
   baseline/extended/lossless, JPEG-LS, JPEG 2000 and HTJ2K decode;
6. stored values to physical values with the Modality LUT / rescale (PS3.3 C.11.1; CT in
   Hounsfield units); every frame resized to ``(size, size)`` (linear, so it commutes
   with the rescale; skipped when the size already matches); then the VOI LUT or window
   (PS3.3 C.11.2) or a named window, and scaling to ``[0, 1]``; MONOCHROME1 is inverted
   (PS3.3 C.7.6.3.1.2) so that higher is always brighter; palette colour through its LUT
   (PS3.3 C.7.6.3.1.5); colour to grey by ITU-R BT.601 luma when one channel is asked for;
7. reject a result that is not finite everywhere (``non_finite_pixels``): ``np.clip``
   keeps NaN, and one NaN image makes every training step of the site fail.

The same byte budget caps every inflation of a file's bytes: gunzip (step 1) and the
deflate of the Deflated Explicit VR Little Endian transfer syntax (PS3.5 A.5), which
pydicom inflates while parsing (step 2).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import logging
import math
import os
import re
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
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

from common.errors import ConfigError

__all__ = [
    "DEFAULT_FILE_BUDGET_BYTES",
    "NAMED_WINDOWS",
    "REASON_HELP",
    "ByteBudget",
    "DicomImage",
    "Preprocessing",
    "Reason",
    "UnusableInputError",
    "check_codestream_sizes",
    "check_lut_values",
    "declared_pixel_bytes",
    "default_file_budget",
    "discover_files",
    "gunzip_if_needed",
    "inflated_size",
    "load_bytes",
    "parse_dataset",
    "quiet_pydicom_logs",
    "read_dicom",
    "read_file_bytes",
    "to_model_input",
]

#: Bumped whenever the pixel pipeline changes, so cached results are not reused.
#: 2: non-finite results and bad LUT parameters are quarantined.
PIPELINE_VERSION = "2"

#: The site machine the default byte budget is sized for: 2 cores, 24 GB of memory.
REFERENCE_SITE_MEMORY_BYTES = 24 * 1000**3
#: Share of that memory all ingest worker processes together may use; the rest stays with
#: the operating system, the site worker (training) and whatever else the hospital runs.
INGEST_MEMORY_SHARE = 1 / 3
#: Peak memory of one file's pipeline per byte of :func:`declared_pixel_bytes` (raw and
#: parsed copies, decoded array, float32 frames, Pillow's copy, LUT and colour outputs).
#: ``bench/ingest.py`` measures it for each pixel path (``memory.near_budget``): 2.4 to 4.0
#: with pydicom 3.0.2 and Pillow 13; 5 leaves a margin.
PIPELINE_EXPANSION = 5
#: Bounds of the default per-file budget (bytes).
MIN_FILE_BUDGET_BYTES = 64 * 1024**2
MAX_FILE_BUDGET_BYTES = 2 * 1024**3
#: Largest absolute value (and smallest non-zero absolute slope) of a LUT parameter
#: accepted; real rescale and window values are many orders of magnitude inside it.
MAX_LUT_MAGNITUDE = 1e12
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def default_file_budget(workers: int = 1) -> int:
    """Per-file byte budget that keeps ``workers`` ingest processes inside a site's memory.

    ``INGEST_MEMORY_SHARE x REFERENCE_SITE_MEMORY_BYTES / (workers x PIPELINE_EXPANSION)``,
    rounded down to MiB and clipped to ``[MIN_FILE_BUDGET_BYTES, MAX_FILE_BUDGET_BYTES]``:
    with the reference 24 GB site, 1 worker gets 1525 MiB, 2 workers 762 MiB each, 4
    workers 381 MiB each. A CT or MR volume of 512 x 512 x 400 frames counts 400 MiB
    (:func:`declared_pixel_bytes`).

    Parameters
    ----------
    workers : int
        Ingest worker processes that run at the same time (>= 1).

    Returns
    -------
    int
        Bytes.

    Raises
    ------
    ConfigError
        If ``workers`` < 1.

    """
    if workers < 1:
        raise ConfigError(f"workers={workers} must be >= 1")
    share = int(REFERENCE_SITE_MEMORY_BYTES * INGEST_MEMORY_SHARE)
    budget = share // (workers * PIPELINE_EXPANSION) // 1024**2 * 1024**2
    return max(MIN_FILE_BUDGET_BYTES, min(MAX_FILE_BUDGET_BYTES, budget))


#: Budget of the functions below when none is given (one process at a time).
DEFAULT_FILE_BUDGET_BYTES = default_file_budget(1)

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
    TOO_LARGE = "too_large"
    BAD_LUT = "bad_lut"
    NON_FINITE_PIXELS = "non_finite_pixels"
    UNLABELLED = "unlabelled"
    DUPLICATE = "duplicate"
    DECODER_CRASHED = "decoder_crashed"
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
    Reason.TOO_LARGE: (
        "the file, its gunzipped or deflated content, or the decoded pixel data its header "
        "declares (Rows x Columns x frames x samples, 4 bytes or more each) is over the "
        "per-file byte budget (--max-file-mib); checked before that much is allocated"
    ),
    Reason.BAD_LUT: (
        "a rescale slope/intercept, window centre/width or LUT descriptor is NaN, "
        "infinite or out of a sane range, so the image would become NaN or garbage"
    ),
    Reason.NON_FINITE_PIXELS: "the preprocessed image holds NaN or infinite values",
    Reason.UNLABELLED: "no row of the labels CSV matches the file",
    Reason.DUPLICATE: "byte-identical to a file already ingested",
    Reason.DECODER_CRASHED: (
        "decoding ended the worker process (a native decoder abort, crash or the "
        "out-of-memory killer); the other files were not affected"
    ),
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


@dataclass
class ByteBudget:
    """The per-file byte budget, and the largest size checked against it.

    One budget caps, for one file: the file's size on disk, its gunzipped size, the
    inflated size of a deflated data set (PS3.5 A.5) and the decoded pixel data its
    header declares. Each is checked before that much memory is allocated.

    Parameters
    ----------
    limit : int
        Bytes, >= 1 (:func:`default_file_budget`).

    Attributes
    ----------
    largest : int
        The largest size (bytes) checked so far; when a check failed, a lower bound of
        the real size. Cached with the file's result, so a later run with another
        budget can tell whether the result still holds.

    """

    limit: int = DEFAULT_FILE_BUDGET_BYTES
    largest: int = 0

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ConfigError(f"byte budget {self.limit} must be >= 1 byte")

    def check(self, size: int, what: str) -> None:
        """Record ``size`` (bytes) of ``what``; raise ``too_large`` if over the limit.

        Raises
        ------
        UnusableInputError
            ``too_large``, with ``what`` as the detail (never a value from the file).

        """
        self.largest = max(self.largest, size)
        if size > self.limit:
            raise UnusableInputError(Reason.TOO_LARGE, f"{what} over the per-file budget")


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
        if self.window is not None and not (
            all(np.isfinite(v) for v in self.window) and self.window[1] > 0
        ):
            raise ConfigError(
                f"window {self.window} must be a finite (center, width) with width > 0"
            )

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
            "decode: pydicom pixel backends (numpy, RLE, pylibjpeg: openjpeg/libjpeg, Pillow)",
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


def read_file_bytes(path: str | os.PathLike[str], *, budget: ByteBudget | None = None) -> bytes:
    """Read a file's bytes, refusing one larger than the budget without reading it.

    Raises
    ------
    UnusableInputError
        ``unreadable`` on an OS error, ``too_large`` when the file is over ``budget``.

    """
    budget = budget if budget is not None else ByteBudget()
    try:
        with Path(path).open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            budget.check(size, "file size")
            data = fh.read(size + 1)
            if len(data) > size:  # it grew since the stat: read on, up to just over the budget
                data += fh.read(max(0, budget.limit + 1 - len(data)))
                budget.check(len(data), "file size")
            return data
    except OSError as exc:
        raise UnusableInputError(Reason.UNREADABLE, type(exc).__name__) from None


def load_bytes(path: str | os.PathLike[str], *, budget: ByteBudget | None = None) -> bytes:
    """Read a file, gunzipping it when its content starts with the gzip magic bytes.

    Parameters
    ----------
    path : path
        The file.
    budget : ByteBudget, optional
        Caps the file size and the gunzipped size (default
        :data:`DEFAULT_FILE_BUDGET_BYTES`).

    Raises
    ------
    UnusableInputError
        ``unreadable`` on an OS error, ``corrupt_gzip`` when decompression fails,
        ``too_large`` when the file or its gunzipped content is over ``budget``.

    """
    budget = budget if budget is not None else ByteBudget()
    data = read_file_bytes(path, budget=budget)
    budget.check(len(data), "file size")
    return gunzip_if_needed(data, budget=budget)


def gunzip_if_needed(data: bytes, *, budget: ByteBudget | None = None) -> bytes:
    """Return ``data``, decompressed if it is a gzip stream (RFC 1952 magic ``1f 8b``).

    The decompressed size is measured first, in 1 MiB pieces that are thrown away
    (:func:`inflated_size`), so a gzip bomb costs about 1 MiB of memory; only content
    within the budget is then decompressed for real (and never more than
    ``budget.limit + 1`` bytes).

    Raises
    ------
    UnusableInputError
        ``corrupt_gzip`` when decompression fails, ``too_large`` when the decompressed
        content is over ``budget`` (default :data:`DEFAULT_FILE_BUDGET_BYTES`).

    """
    if not data.startswith(_GZIP_MAGIC):
        return data
    budget = budget if budget is not None else ByteBudget()
    try:
        size = inflated_size(data, limit=budget.limit, container="gzip")
    except zlib.error as exc:
        raise UnusableInputError(Reason.CORRUPT_GZIP, type(exc).__name__) from None
    budget.check(size, "gunzipped size")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
            out = gz.read(budget.limit + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise UnusableInputError(Reason.CORRUPT_GZIP, type(exc).__name__) from None
    budget.check(len(out), "gunzipped size")
    return out


_INFLATE_OUT_CHUNK = 1 << 20
_INFLATE_IN_CHUNK = 1 << 18


def inflated_size(stream: bytes | memoryview, *, limit: int, container: str = "raw") -> int:
    """Size of deflate data (RFC 1951) once inflated, counted up to ``limit + 1``.

    The output is produced in 1 MiB pieces and thrown away, so measuring costs about
    1 MiB of memory whatever the stream declares.

    Parameters
    ----------
    stream : bytes or memoryview
        With ``container="raw"``, raw deflate data (no zlib or gzip header), e.g. the
        data set of a Deflated Explicit VR Little Endian file (PS3.5 A.5); with
        ``container="gzip"``, one or more gzip members (RFC 1952), all counted.
    limit : int
        Stop counting once the size is over this many bytes.
    container : str
        ``"raw"`` or ``"gzip"``.

    Returns
    -------
    int
        Inflated size in bytes; when over ``limit``, a value > ``limit`` (a lower bound).

    Raises
    ------
    zlib.error
        If the stream is not valid deflate data.

    """
    wbits = 16 + zlib.MAX_WBITS if container == "gzip" else -zlib.MAX_WBITS
    total = 0
    view = memoryview(stream)
    while True:
        inflater = zlib.decompressobj(wbits)
        member_end = len(view)
        for start in range(0, len(view), _INFLATE_IN_CHUNK):
            chunk = view[start : start + _INFLATE_IN_CHUNK]
            pending: bytes | memoryview = chunk
            while True:
                out = inflater.decompress(pending, _INFLATE_OUT_CHUNK)
                total += len(out)
                if total > limit:
                    return total
                stalled = not out and len(inflater.unconsumed_tail) == len(pending)
                pending = inflater.unconsumed_tail
                # After the end of the stream, bytes after it (e.g. DICOM's even-length
                # pad byte) may stay in unconsumed_tail for good when max_length is given.
                if inflater.eof or stalled:
                    break
                # A full output piece may leave output pending even with no input left.
                if not pending and len(out) < _INFLATE_OUT_CHUNK:
                    break
            if inflater.eof:
                left = len(inflater.unconsumed_tail) + len(inflater.unused_data)
                member_end = start + len(chunk) - left
                break
        view = view[member_end:]
        # gzip allows several members one after the other (RFC 1952 2.2).
        if container != "gzip" or bytes(view[:2]) != _GZIP_MAGIC:
            return total


class _BudgetedReader(io.BytesIO):
    """File-like over a file's bytes that bounds pydicom's inflation of a deflated data set.

    pydicom 3.0.2 (``pydicom.filereader.read_partial``) reads the rest of a Deflated
    Explicit VR Little Endian file with ``read()`` (no size) and inflates it with
    ``zlib.decompress``, with no limit. Every other read pydicom makes asks for a size.
    So a read to the end first measures the inflated size of what it returns
    (:func:`inflated_size`) and raises ``too_large`` when it is over the budget;
    pydicom then never inflates more than the budget.
    """

    def __init__(self, data: bytes, budget: ByteBudget) -> None:
        super().__init__(data)
        self._data = data
        self._budget = budget

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:
            rest = memoryview(self._data)[self.tell() :]
            try:
                inflated = inflated_size(rest, limit=self._budget.limit)
            except zlib.error:
                inflated = 0  # not deflate data: pydicom reports it if it inflates it
            finally:
                rest.release()
            self._budget.check(inflated, "inflated data set")
        return super().read(size)


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


def parse_dataset(data: bytes, *, budget: ByteBudget | None = None) -> Dataset:
    """Parse DICOM bytes (Part 10 file, or a bare data set without preamble).

    A deflated data set (Deflated Explicit VR Little Endian, PS3.5 A.5) is measured
    before pydicom inflates it and refused when its inflated size is over ``budget``.

    Parameters
    ----------
    data : bytes
        File content (already gunzipped; see :func:`load_bytes`).
    budget : ByteBudget, optional
        Caps the inflated size of a deflated data set (default
        :data:`DEFAULT_FILE_BUDGET_BYTES`).

    Raises
    ------
    UnusableInputError
        ``not_dicom``, ``truncated``, ``malformed_header`` or ``too_large``.

    """
    budget = budget if budget is not None else ByteBudget()
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        with warnings.catch_warnings(record=True) as caught:
            # Recorded, not shown: pydicom's warnings may quote header values (PHI).
            warnings.simplefilter("always")
            ds = pydicom.dcmread(_BudgetedReader(data, budget), force=not has_preamble)
    except UnusableInputError:
        raise
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


def declared_pixel_bytes(ds: Dataset) -> int:
    """Bytes of the decoded pixel data the header declares, as the pipeline holds it.

    ``Rows x Columns x frames x samples x max(item size, 4)``: samples is Samples per
    Pixel, or 3 for PALETTE COLOR (decoded to RGB through its LUT, PS3.3 C.7.6.3.1.5);
    the item size is that of the numpy dtype pydicom decodes ``Bits Allocated`` into
    (1 -> 1 byte, 1-bit data being unpacked; 8 -> 1; 16 -> 2; 32 -> 4; 64 -> 8), and at
    least 4 because every sample is then processed as float32. Attributes from PS3.3
    C.7.6.3 (Image Pixel module) and C.7.6.6 (Number of Frames). Computed with Python
    integers from header values only, before anything is decoded; the pipeline's peak
    memory is at most about :data:`PIPELINE_EXPANSION` times this.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The parsed data set.

    Returns
    -------
    int
        Bytes; 0 when Rows or Columns is missing (decoding then fails with
        ``missing_pixel_attributes``).

    Raises
    ------
    UnusableInputError
        ``malformed_header`` when one of those values is not a number.

    """
    try:
        rows = int(ds.get("Rows", 0) or 0)
        cols = int(ds.get("Columns", 0) or 0)
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
        samples = max(1, int(ds.get("SamplesPerPixel", 1) or 1))
        bits = max(1, int(ds.get("BitsAllocated", 8) or 8))
    except (TypeError, ValueError) as exc:
        raise UnusableInputError(Reason.MALFORMED_HEADER, type(exc).__name__) from None
    if _text(ds, "PhotometricInterpretation").upper() == "PALETTE COLOR":
        samples = 3
    itemsize = next((n for n in (1, 2, 4, 8) if bits <= 8 * n), -(-bits // 8))
    return max(0, rows) * max(0, cols) * frames * samples * max(itemsize, 4)


def _codestream_size(frame: bytes, ts: UID) -> int | None:
    """Return the samples per frame a JPEG-family codestream header declares, or ``None``.

    Read with the decoder libraries' header parsers (pylibjpeg-openjpeg
    ``get_parameters`` for JPEG 2000 / HTJ2K, ISO/IEC 15444-1 A.5.1 SIZ; pylibjpeg-libjpeg
    ``get_parameters`` for JPEG and JPEG-LS, ISO/IEC 10918-1 B.2.2 / 14495-1 SOF);
    ``None`` when no parser is installed or the header does not parse.
    """
    try:
        if ts in JPEG2000TransferSyntaxes:
            from openjpeg.utils import get_parameters as j2k_parameters

            j2k = j2k_parameters(frame)
            return int(j2k["rows"]) * int(j2k["columns"]) * int(j2k["samples_per_pixel"])
        if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
            from libjpeg.utils import get_parameters as jpg_parameters

            jpg = jpg_parameters(frame)
            return int(jpg["rows"]) * int(jpg["columns"]) * int(jpg["nr_components"])
    except Exception:  # no parser installed, or a header the decoder will reject
        return None
    return None


def check_codestream_sizes(ds: Dataset) -> None:
    """Refuse compressed frames whose own header declares more samples than the DICOM one.

    JPEG, JPEG-LS, JPEG 2000 and HTJ2K decoders allocate what the codestream's header
    declares, not what Rows and Columns say: a 2 KB file with a 64 x 64 header can carry
    a codestream of 16000 x 16000 and make the decoder allocate over 1 GB before pydicom
    notices the mismatch. Each frame's codestream header is read (without decoding) and
    its rows x columns x components compared with Rows x Columns x Samples per Pixel
    (PS3.5 8.2: they must agree). RLE (PS3.5 G) and native data are sized by the DICOM
    header and need no check.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A data set whose declared pixel data already fits the budget.

    Raises
    ------
    UnusableInputError
        ``too_large`` when a frame's codestream declares more samples than the header.

    """
    meta = getattr(ds, "file_meta", None)
    ts = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if ts not in JPEG2000TransferSyntaxes + JPEGTransferSyntaxes + JPEGLSTransferSyntaxes:
        return
    frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    declared = int(ds.Rows) * int(ds.Columns) * max(1, int(ds.get("SamplesPerPixel", 1) or 1))
    try:
        for frame in generate_frames(ds.PixelData, number_of_frames=frames):
            samples = _codestream_size(frame, ts)
            if samples is not None and samples > declared:
                raise UnusableInputError(
                    Reason.TOO_LARGE, "codestream larger than the declared frame"
                )
    except UnusableInputError:
        raise
    except Exception:  # fragments the decoder will reject on its own
        return


#: Decoder plugins of pydicom for compressed (encapsulated) Pixel Data, in the order they
#: are tried. pydicom's own (RLE Lossless), pylibjpeg (libjpeg, OpenJPEG) and Pillow
#: report a bad codestream as a Python exception. GDCM is never used, even where it is
#: installed (medfed does not install it): on some headers its SWIG wrapper lets a C++
#: exception escape and the whole process aborts, which no ``except`` can catch (e.g.
#: JPEG Lossless RGB with Bits Stored 1 of Bits Allocated 8: ``gdcmImageCodec.cxx``,
#: "PF.GetBitsAllocated() == PF.GetBitsStored()"). Every transfer syntax GDCM decodes,
#: pylibjpeg decodes too (pydicom 3's decoder registry).
DECODING_PLUGINS = ("pydicom", "pylibjpeg", "pillow")


def _pixel_array(ds: Dataset) -> np.ndarray:
    """``ds.pixel_array`` through :data:`DECODING_PLUGINS`, in order, for compressed data.

    Native (uncompressed) Pixel Data is decoded by pydicom itself. For encapsulated data
    each installed plugin of :data:`DECODING_PLUGINS` is tried until one decodes; the last
    plugin's exception propagates when none does.

    Raises
    ------
    NotImplementedError
        No plugin of :data:`DECODING_PLUGINS` is installed for the transfer syntax.
    Exception
        Whatever the last plugin raised on the data (classified by :func:`_decode`).
    """
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    if not ts.is_compressed:
        return ds.pixel_array
    available = get_decoder(ts).available_plugins
    plugins = [p for p in DECODING_PLUGINS if p in available]
    if not plugins:
        raise NotImplementedError(f"no decoding plugin of {DECODING_PLUGINS} is installed")
    for plugin in plugins[:-1]:
        ds.pixel_array_options(decoding_plugin=plugin)
        try:
            return ds.pixel_array
        except Exception:  # the next plugin may read it; the last one's error is reported
            continue
    ds.pixel_array_options(decoding_plugin=plugins[-1])
    return ds.pixel_array


def _decode(ds: Dataset) -> np.ndarray:
    """Decode stored values, ``(F, R, C)`` or ``(F, R, C, S)``; YBR becomes RGB."""
    try:
        arr = _pixel_array(ds)
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


def _lut_values(src: Dataset, keyword: str) -> list[float]:
    """Every value of a numeric LUT attribute as a float (several for multi-valued)."""
    value = src.get(keyword)
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        raise UnusableInputError(Reason.BAD_LUT, f"{keyword} is not a number") from None


def check_lut_values(ds: Dataset, *, voi: bool = True) -> None:
    """Refuse LUT parameters that would make a greyscale image NaN, infinite or garbage.

    Checked, on the top level and in the Shared/first Per-frame Functional Groups of an
    enhanced IOD (as the pipeline reads them):

    - Rescale Slope and Intercept (PS3.3 C.11.1.1.2): finite, ``|value| <=``
      :data:`MAX_LUT_MAGNITUDE`, slope non-zero with ``|slope| >= 1 / MAX_LUT_MAGNITUDE``;
      the stored range (2**Bits Stored values) through them must be finite in float32;
    - Window Center and Width, every value (PS3.3 C.11.2.1.2): finite, ``|value| <=``
      :data:`MAX_LUT_MAGNITUDE`; width >= 1, or > 0 with VOI LUT Function LINEAR_EXACT;
    - LUT Descriptor of a Modality or VOI LUT Sequence (PS3.3 C.11.1.1.1, C.11.2.1.1):
      bits per entry between 1 and 16.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The parsed data set (a greyscale image).
    voi : bool
        Whether the file's own VOI LUT / window will be applied (``Preprocessing``
        ``intensity`` ``auto`` or ``voi`` without a ``window`` of its own); when not,
        the window values and the VOI LUT Sequence are not used and not checked.

    Raises
    ------
    UnusableInputError
        ``bad_lut``, naming the attribute and the rule (never its value).

    """
    src = _lut_source(ds)
    limit = MAX_LUT_MAGNITUDE
    keywords: tuple[str, ...] = ("RescaleSlope", "RescaleIntercept")
    if voi:
        keywords += ("WindowCenter", "WindowWidth")
    for kw in keywords:
        for v in _lut_values(src, kw):
            if not math.isfinite(v) or abs(v) > limit:
                raise UnusableInputError(Reason.BAD_LUT, f"{kw} not finite or out of range")
    slopes = _lut_values(src, "RescaleSlope")
    if any(abs(v) < 1.0 / limit for v in slopes):
        raise UnusableInputError(Reason.BAD_LUT, "RescaleSlope is zero or too small")
    exact = _text(src, "VOILUTFunction").upper() == "LINEAR_EXACT"
    for w in _lut_values(src, "WindowWidth") if voi else []:
        if (w <= 0) if exact else (w < 1):
            raise UnusableInputError(Reason.BAD_LUT, "WindowWidth below its minimum")
    for seq_kw in ("ModalityLUTSequence", "VOILUTSequence") if voi else ("ModalityLUTSequence",):
        for item in src.get(seq_kw) or []:
            desc = item.get("LUTDescriptor")
            try:
                bits = int(desc[2]) if desc is not None else 16
            except (TypeError, ValueError, IndexError):
                raise UnusableInputError(Reason.BAD_LUT, f"{seq_kw} descriptor") from None
            if not 1 <= bits <= 16:
                raise UnusableInputError(Reason.BAD_LUT, f"{seq_kw} bits per entry")
    if slopes or "RescaleIntercept" in src:
        slope = slopes[0] if slopes else 1.0
        intercepts = _lut_values(src, "RescaleIntercept")
        intercept = intercepts[0] if intercepts else 0.0
        for stored in _stored_range(src):
            if not abs(stored * slope + intercept) < _FLOAT32_MAX:
                raise UnusableInputError(Reason.BAD_LUT, "rescaled range not finite")


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


def _require_finite(arr: np.ndarray, stage: str) -> np.ndarray:
    """Return ``arr``; raise ``non_finite_pixels`` if any value is NaN or infinite.

    Checked after each LUT: later steps clip (``np.clip`` maps infinity to a bound,
    so an overflow would silently become a white image) or keep NaN.
    """
    if not np.isfinite(arr).all():
        raise UnusableInputError(Reason.NON_FINITE_PIXELS, f"after {stage}")
    return arr


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
    _require_finite(modality, "modality LUT")
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
        voi = _require_finite(np.asarray(apply_voi_lut(modality, win)), "window")
        unit = _scale(voi, *_voi_output_range(win, (lo_m, hi_m)))
    elif prep.intensity in ("auto", "voi") and _has_voi(src):
        seq = src.get("VOILUTSequence")
        # A VOI LUT Sequence indexes by integer input values (PS3.3 C.11.2.1.1).
        values = np.rint(modality).astype(np.int64) if seq else modality
        voi = _require_finite(np.asarray(apply_voi_lut(values, src)), "VOI LUT")
        unit = _scale(voi, *_voi_output_range(src, (lo_m, hi_m)))
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


#: Vendor families for :func:`dataset_facts` (pattern on the lower-case Manufacturer).
#: The family names are medfed's own words, so no header value is ever passed on.
_VENDOR_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (family, re.compile(pattern))
    for family, pattern in (
        ("GE", r"(?<![a-z])(?:ge|gems|gehc)(?![a-z])|general electric"),
        ("Siemens", r"siemens"),
        ("Philips", r"philips|\badac\b"),
        ("Canon/Toshiba", r"toshiba|canon"),
        ("Fujifilm", r"fuji"),
        ("Agfa", r"agfa"),
        ("Carestream/Kodak", r"carestream|kodak"),
        ("Hologic", r"hologic|lorad"),
        ("Samsung", r"samsung|medison"),
        ("Hitachi", r"hitachi|aloka"),
        ("Konica Minolta", r"konica|minolta"),
        ("Mindray", r"mindray"),
        ("Esaote", r"esaote"),
        ("United Imaging", r"united imaging|\buih\b"),
        ("Shimadzu", r"shimadzu"),
        ("Varian", r"varian"),
        ("Elekta", r"elekta"),
        ("Bruker", r"bruker"),
    )
)


def _vendor_family(manufacturer: str) -> str:
    """Coarse category of a Manufacturer (0008,0070): a known vendor family or ``other``."""
    if not manufacturer:
        return ""
    text = manufacturer.lower()
    return next((fam for fam, rx in _VENDOR_FAMILIES if rx.search(text)), "other")


def dataset_facts(ds: Dataset) -> dict[str, str]:
    """Non-identifying facts for summary counts.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A parsed data set (its file meta gives the transfer syntax).

    Returns
    -------
    dict[str, str]
        ``modality``, ``sop_class``, ``transfer_syntax`` (dictionary terms) and
        ``manufacturer``: a coarse vendor family from a fixed list (``GE``,
        ``Siemens``, ..., ``other``), never the header value, which may name a
        hospital or a workstation (DESIGN: no header value is logged or stored);
        ``""`` when absent. The raw value is in :func:`dataset_identifiers`.

    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID", None) if meta is not None else None
    sop = _sop_class(ds)
    return {
        "modality": _text(ds, "Modality"),
        "manufacturer": _vendor_family(_text(ds, "Manufacturer")),
        "sop_class": sop.name if sop else "",
        "transfer_syntax": UID(str(ts)).name if ts else "",
    }


def dataset_identifiers(ds: Dataset) -> dict[str, str]:
    """Raw header values that must be hashed at once (never logged, stored or printed).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A parsed data set; only the attributes named below are read.

    Returns
    -------
    dict[str, str]
        ``sop_instance_uid``, ``study_instance_uid``, ``accession_number``,
        ``patient_id`` (label keys and patient groups) and ``manufacturer`` (counted
        by its salted hash, to tell manufacturers apart without naming them); ``""``
        when absent.

    """
    return {
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "accession_number": _text(ds, "AccessionNumber"),
        "patient_id": _text(ds, "PatientID"),
        "manufacturer": _text(ds, "Manufacturer"),
    }


def read_dicom(
    data: bytes,
    prep: Preprocessing,
    *,
    ds: Dataset | None = None,
    budget: ByteBudget | None = None,
) -> DicomImage:
    """Parse, check, decode and preprocess one DICOM file's bytes.

    Parameters
    ----------
    data : bytes
        File content (already gunzipped; see :func:`load_bytes`).
    prep : Preprocessing
        Output size, channels, intensity mapping and frame selection.
    ds : pydicom.dataset.Dataset, optional
        The already-parsed data set of ``data`` (saves a second parse).
    budget : ByteBudget, optional
        Per-file byte budget: the decoded pixel data the header declares
        (:func:`declared_pixel_bytes`) and a deflated data set's inflated size must
        fit in it (default :data:`DEFAULT_FILE_BUDGET_BYTES`).

    Returns
    -------
    DicomImage
        ``pixels`` float32 ``(F, C, size, size)`` in ``[0, 1]``.

    Raises
    ------
    UnusableInputError
        With the :class:`Reason` the file cannot be used, e.g. ``too_large`` (before
        decoding), ``bad_lut`` (before decoding) or ``non_finite_pixels``. Never any
        other exception type for bad input; the message holds no header value.

    """
    budget = budget if budget is not None else ByteBudget()
    with warnings.catch_warnings():
        # pydicom's validation warnings quote header values, which may be PHI.
        warnings.simplefilter("ignore")
        if ds is None:
            ds = parse_dataset(data, budget=budget)
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
        try:
            budget.check(declared_pixel_bytes(ds), "declared pixel data")
            check_codestream_sizes(ds)
            if photometric in ("MONOCHROME1", "MONOCHROME2"):
                file_voi = prep.window is None and prep.intensity in ("auto", "voi")
                check_lut_values(ds, voi=file_voi)
        except UnusableInputError:
            raise
        except Exception as exc:  # e.g. a LUT sequence item without the expected structure
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
    if not np.isfinite(unit).all():
        # np.clip below keeps NaN: an image that is not finite now would reach training.
        raise UnusableInputError(Reason.NON_FINITE_PIXELS)
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
