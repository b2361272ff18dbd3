"""Hypothesis strategies that mutate real DICOM files (issue 14, item 4).

Two kinds of mutation, each drawn by hypothesis so a failure shrinks to a small,
replayable example:

- **byte level** on the file's bytes: truncation, flipped bytes, overwritten or deleted
  ranges, an element's length field set to an absurd value;
- **structural**, through pydicom, on a parsed copy: absurd Image Pixel module values
  (Rows, Columns, Number of Frames, Bits Allocated/Stored, Samples per Pixel, ...),
  wrong VRs, huge declared frames, pixel data of the wrong length, deeply nested
  sequences; the result is written back with ``save_as``.

Nothing here logs or prints a header value; the seeds are named by their number in
:data:`SEED_FILES`, never by a value read from them.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

#: Small real files of the shared corpus that decode (INVENTORY.json ``px`` ok), one per
#: kind of input: transfer syntaxes, grey/colour, palette, multi-frame, CT with rescale.
SEED_FILES: tuple[str, ...] = (
    "pydicom_3.0.2_test_files/CT_small.dcm",
    "pydicom_3.0.2_test_files/MR_small.dcm",
    "pydicom_3.0.2_test_files/SC_rgb_small_odd.dcm",
    "pydicom_3.0.2_test_files/SC_rgb_small_odd_big_endian.dcm",
    "pydicom_3.0.2_test_files/image_dfl.dcm",
    "pydicom_3.0.2_test_files/rtdose_1frame.dcm",
    "pydicom_3.0.2_test_files/rtdose_rle.dcm",
    "pydicom_3.0.2_test_files/JPEGLSNearLossless_08.dcm",
    "pylibjpeg_data/ljdata/ds/JPEG2000Lossless/MR_small_jp2klossless.dcm",
    "pylibjpeg_data/ljdata/ds/JPEGBaseline/SC_rgb_small_odd_jpeg.dcm",
    "pylibjpeg_data/ljdata/ds/JPEGLosslessSV1/SC_rgb_jpeg_gdcm.dcm",
    "pylibjpeg_data/ljdata/ds/RLELossless/SC_rgb_rle_2frame.dcm",
    "pydicom_data/JLSL_08_07_0_1F.dcm",
    "pydicom_data/liver_j2k.dcm",
)

#: Image Pixel module attributes (PS3.3 C.7.6.3) and Number of Frames (C.7.6.6).
DIMENSION_KEYWORDS: tuple[str, ...] = (
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "SamplesPerPixel",
    "PixelRepresentation",
    "PlanarConfiguration",
)
#: Elements whose VR is rewritten by :func:`structural_mutations`.
VR_TARGETS: tuple[str, ...] = (
    *DIMENSION_KEYWORDS,
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "SOPClassUID",
    "PatientID",
    "PixelData",
)
_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "IS", "DS", "CS", "LO", "UI", "OB", "OW", "UN", "SQ")
#: Absurd values of unsigned 16-bit attributes and of IS strings.
_ABSURD_INTS = (0, 1, 2, 3, 7, 9, 15, 17, 31, 33, 63, 64, 65, 255, 4096, 32767, 65535)
_ABSURD_IS = ("0", "-1", "1", "2", "1000000", "2147483647", "99999999999", " 1e3", "1.5", "A")


@dataclass(frozen=True)
class Seed:
    """One seed file: its number in :data:`SEED_FILES` and its bytes."""

    number: int
    data: bytes


@cache
def load_seeds(dicom_root: Path) -> tuple[Seed, ...]:
    """Read every seed (checked against INVENTORY.json: each must be listed as decoding).

    Raises
    ------
    FileNotFoundError
        If a seed or the inventory is missing (the caller fails the test).
    """
    inventory = {e["file"]: e for e in json.loads((dicom_root / "INVENTORY.json").read_text())}
    seeds = []
    for i, rel in enumerate(SEED_FILES):
        entry = inventory.get(rel)
        if entry is None or not str(entry.get("px", "")).startswith("ok"):
            raise FileNotFoundError(f"seed #{i} is not a decodable file of the inventory")
        seeds.append(Seed(i, (dicom_root / rel).read_bytes()))
    return tuple(seeds)


def _parse(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), force=True)


def _save(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


# ------------------------------------------------------------------------ byte level


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with one to four byte-level mutations."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "delete", "length"]))
        # mostly past the preamble and "DICM": a broken preamble is just "not DICOM"
        low = 132 if len(out) > 264 and draw(st.integers(0, 7)) else 0
        pos = draw(st.integers(low, len(out) - 1))
        if kind == "truncate":
            del out[pos:]
        elif kind == "flip":
            out[pos] ^= draw(st.integers(1, 255))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[pos : pos + len(chunk)] = chunk
        elif kind == "delete":
            del out[pos : pos + draw(st.integers(1, 64))]
        else:
            _absurd_length(draw, out)
    return bytes(out)


def _absurd_length(draw: st.DrawFn, out: bytearray) -> None:
    """Set the length field after a well-known tag to an absurd value (explicit/implicit)."""
    tag = draw(st.sampled_from([0x00280010, 0x00280011, 0x00280008, 0x7FE00010, 0x00100020]))
    pattern = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    at = out.find(pattern, 132 if len(out) > 132 else 0)
    if at < 0:
        return
    width = draw(st.sampled_from([2, 4]))
    offset = at + draw(st.sampled_from([4, 6, 8]))  # implicit / explicit short / long VR
    value = draw(st.sampled_from([0xFFFF, 0xFFFE, 0x7FFF, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF]))
    out[offset : offset + width] = (value & (256**width - 1)).to_bytes(width, "little")


# ------------------------------------------------------------------------ structural


def _nested(depth: int) -> Sequence:
    item = Dataset()
    item.CodeValue = "X"
    seq = Sequence([item])
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = seq
        seq = Sequence([outer])
    return seq


def _raw_value(vr: str, draw: st.DrawFn) -> Any:
    if vr == "SQ":
        return Sequence([Dataset()]) if draw(st.booleans()) else Sequence([])
    if vr in ("OB", "OW", "UN"):
        return draw(st.binary(max_size=24))
    if vr in ("US", "SS", "UL", "SL"):
        return draw(st.sampled_from(_ABSURD_INTS))
    if vr in ("FL", "FD"):
        return draw(st.sampled_from([0.0, -1.0, 1e300, float("nan"), float("inf")]))
    if vr in ("IS", "DS"):
        return draw(st.sampled_from(_ABSURD_IS))
    return draw(
        st.sampled_from(["", "MONOCHROME2", "PALETTE COLOR", "YBR_FULL", "1.2.3", "X" * 64])
    )


@st.composite
def structural_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` parsed, with one to three structural changes, written back."""
    ds = _parse(data)
    for _ in range(draw(st.integers(1, 3))):
        try:
            kind = draw(
                st.sampled_from(["dimension", "vr", "frames", "pixel-length", "nested", "delete"])
            )
            if kind == "dimension":
                kw = draw(st.sampled_from(DIMENSION_KEYWORDS))
                if kw == "NumberOfFrames":
                    setattr(ds, kw, draw(st.sampled_from(_ABSURD_IS)))
                else:
                    setattr(ds, kw, draw(st.sampled_from(_ABSURD_INTS)))
            elif kind == "vr":
                kw = draw(st.sampled_from(VR_TARGETS))
                vr = draw(st.sampled_from(_VRS))
                tag = Tag(kw)
                ds[tag] = DataElement(tag, vr, _raw_value(vr, draw))
            elif kind == "frames":
                # a small file declaring a huge number (or size) of frames
                ds.NumberOfFrames = str(draw(st.sampled_from([2, 10, 1000, 10**6, 2**31 - 1])))
                if draw(st.booleans()):
                    ds.Rows = ds.Columns = draw(st.sampled_from([1, 512, 4096, 65535]))
            elif kind == "pixel-length":
                if "PixelData" in ds:
                    raw = bytes(ds.PixelData)
                    cut = draw(st.integers(0, len(raw)))
                    extra = bytes(draw(st.integers(0, 64)))
                    ds.PixelData = raw[:cut] + extra
            elif kind == "nested":
                ds.ContentSequence = _nested(draw(st.sampled_from([1, 8, 64, 200])))
            else:
                kw = draw(st.sampled_from(VR_TARGETS))
                if kw in ds:
                    del ds[kw]
        except Exception:  # pydicom refuses this value: the step is skipped
            continue
    try:
        return _save(ds)
    except Exception:  # pydicom cannot write this combination: fall back to bytes
        return draw(byte_mutations(data))


@dataclass(frozen=True)
class Mutated:
    """A mutated file; its repr names the seed and a hash, never the bytes (PHI-safe)."""

    seed: int
    how: str
    data: bytes

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.data).hexdigest()[:12]
        return (
            f"Mutated(seed=#{self.seed}, how={self.how!r}, {len(self.data)} bytes, sha256={digest})"
        )


@st.composite
def mutated_files(draw: st.DrawFn, seeds: tuple[Seed, ...]) -> Mutated:
    """A seed mutated structurally, at byte level, or both."""
    seed = draw(st.sampled_from(seeds))
    how = draw(st.sampled_from(["bytes", "structure", "both"]))
    data = seed.data
    if how in ("structure", "both"):
        data = draw(structural_mutations(data))
    if how in ("bytes", "both"):
        data = draw(byte_mutations(data))
    return Mutated(seed.number, how, data)
