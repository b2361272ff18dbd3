"""Fuzzing the DICOM ingest path with mutated real files (issue 14, item 4).

Real files of the shared corpus (``tests/fuzz/dicom_mutations.py``) are truncated,
flipped, given wrong VRs, absurd lengths and dimensions, huge declared frames and deeply
nested sequences, and fed to the per-file step of ``medfed ingest``
(``client.data.ingest._process_bytes``) and to ``read_dicom``. Every file ends ingested
or quarantined with a :class:`~client.data.dicom_read.Reason` other than
``unexpected_error``, never with an exception, within a bounded memory (tracemalloc peak
below the pipeline's documented expansion of the per-file budget) and time.

Failure messages name the seed number and a hash of the mutated bytes, never a header
value or a file name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings

from client.data.dicom_read import (
    PIPELINE_EXPANSION,
    Preprocessing,
    Reason,
    UnusableInputError,
    quiet_pydicom_logs,
    read_dicom,
)
from client.data.ingest import IngestOptions, _process_bytes, ingest
from tests.fuzz.dicom_mutations import SEED_FILES, Mutated, Seed, load_seeds, mutated_files

MIB = 1024**2
#: Per-file byte budget of these tests: small, so "bounded memory" is a sharp check.
LIMIT = 16 * MIB
#: tracemalloc peak allowed per file: the pipeline's documented expansion of the budget.
PEAK = PIPELINE_EXPANSION * LIMIT
#: Seconds one file may take (generous: the machine is shared; real files take < 1 s).
SECONDS_PER_FILE = 30.0
PREP = Preprocessing(size=16)
SALT = b"fuzz-salt-0123456789abcdef012345"
REASONS = {r.value for r in Reason} - {Reason.UNEXPECTED_ERROR.value}

FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def seeds(shared_data_dir: Path) -> tuple[Seed, ...]:
    """The seed files (fails, never skips, when the shared data is incomplete)."""
    try:
        return load_seeds(shared_data_dir / "dicom")
    except (FileNotFoundError, KeyError, ValueError) as exc:
        pytest.fail(f"DICOM seed files missing from the shared data: {exc}")


def _outcome(data: bytes) -> tuple[str | None, str, int, float]:
    """``(reason, detail, tracemalloc peak, seconds)`` of the ingest step on ``data``."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with quiet_pydicom_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = _process_bytes(data, hashlib.sha256(data).hexdigest(), PREP, SALT, LIMIT)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if res.reason is None:
        assert res.pixels is not None and np.isfinite(res.pixels).all()
        assert res.pixels.dtype == np.float32 and res.pixels.shape[1:] == (1, 16, 16)
    return res.reason, res.detail, peak, seconds


def check_ingested_or_quarantined(m: Mutated) -> None:
    """The property. Messages hold the reason code and numbers only (no header values)."""
    reason, detail, peak, seconds = _outcome(m.data)
    assert reason is None or reason in REASONS, f"{m!r}: unexpected error {detail}"
    assert peak <= PEAK + 4 * len(m.data), f"{m!r}: traced peak {peak} bytes"
    assert seconds < SECONDS_PER_FILE, f"{m!r}: {seconds:.1f} s"


def check_read_dicom_raises_only_unusable(m: Mutated) -> None:
    try:
        with quiet_pydicom_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = read_dicom(m.data, PREP)
    except UnusableInputError as exc:
        assert exc.reason is not Reason.UNEXPECTED_ERROR
    else:
        assert np.isfinite(image.pixels).all()


# ----------------------------------------------------------------------- properties


def test_mutated_files_are_ingested_or_quarantined(seeds: tuple[Seed, ...]) -> None:
    @FAST
    @given(m=mutated_files(seeds))
    def run(m: Mutated) -> None:
        check_ingested_or_quarantined(m)
        check_read_dicom_raises_only_unusable(m)

    run()


@pytest.mark.slow
def test_mutated_files_large_corpus(seeds: tuple[Seed, ...]) -> None:
    @SLOW
    @given(m=mutated_files(seeds))
    def run(m: Mutated) -> None:
        check_ingested_or_quarantined(m)
        check_read_dicom_raises_only_unusable(m)

    run()


# --------------------------------------------------- targeted classes, by construction


def _crafted(seed: Seed, **elements: object) -> Mutated:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(seed.data), force=True)
        for kw, value in elements.items():
            setattr(ds, kw, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
    return Mutated(seed.number, "crafted", buf.getvalue())


@pytest.mark.parametrize(
    ("elements", "reasons"),
    [
        ({"NumberOfFrames": "2147483647"}, {"too_large"}),
        ({"Rows": 65535, "Columns": 65535, "NumberOfFrames": "1000"}, {"too_large"}),
        (
            {"Rows": 0},
            {"missing_pixel_attributes", "undecodable_pixel_data", "truncated_pixel_data"},
        ),
        ({"BitsAllocated": 63}, {"undecodable_pixel_data", "too_large", "truncated_pixel_data"}),
        ({"SamplesPerPixel": 65535}, {"too_large"}),
    ],
    ids=["frames-2^31", "rows-cols-frames", "rows-0", "bits-63", "samples-65535"],
)
def test_absurd_dimensions_are_quarantined_before_allocating(
    seeds: tuple[Seed, ...], elements: dict[str, object], reasons: set[str]
) -> None:
    # Prepare: the plain CT seed with absurd Image Pixel module values
    m = _crafted(seeds[0], **elements)
    # Execute
    reason, _, peak, _ = _outcome(m.data)
    # Assert: the reason fits; memory stays far below what the header declares
    assert reason in reasons, reason
    assert peak <= PEAK


def _outcome_in_child(data: bytes) -> tuple[str | None, int]:
    """``(reason, signal)`` of the ingest step run in a forked child (0: it exited).

    A native decoder that aborts kills only the child, so the test reports it instead of
    dying with it.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the step, send the reason back, never return to pytest
        code = 1
        try:
            os.close(read_fd)
            reason, *_ = _outcome(data)
            os.write(write_fd, json.dumps(reason).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        sent = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, "the ingest step failed in the child"
    return json.loads(sent), 0


@pytest.mark.parametrize(
    "elements",
    [{"BitsStored": 1, "HighBit": 7}, {"BitsStored": 1, "HighBit": 0}],
    ids=["bits-stored-1-high-bit-7", "bits-stored-1-high-bit-0"],
)
def test_a_header_that_aborts_gdcm_is_ingested_or_quarantined(
    seeds: tuple[Seed, ...], elements: dict[str, object]
) -> None:
    # Prepare: the JPEG Lossless RGB seed with Bits Stored 1 of Bits Allocated 8, which
    # made GDCM abort the whole process (a C++ exception through its SWIG wrapper),
    # found by test_mutated_files_large_corpus
    seed = next(s for s in seeds if SEED_FILES[s.number].endswith("SC_rgb_jpeg_gdcm.dcm"))
    m = _crafted(seed, **elements)
    # Execute: in a child, so an abort fails this test instead of killing the run
    reason, signal_number = _outcome_in_child(m.data)
    # Assert
    assert signal_number == 0, f"{m!r}: the ingest step died of signal {signal_number}"
    assert reason is None or reason in REASONS, reason


def test_deeply_nested_sequences_are_ingested_or_quarantined(seeds: tuple[Seed, ...]) -> None:
    # Prepare: a real image carrying a 200-deep nest of Content Sequences
    from tests.fuzz.dicom_mutations import _nested

    m = _crafted(seeds[1], ContentSequence=_nested(200))
    # Execute / Assert
    check_ingested_or_quarantined(m)


def test_medfed_ingest_gives_every_mutated_file_an_outcome(
    tmp_path: Path, seeds: tuple[Seed, ...]
) -> None:
    # Prepare: an export of the real seeds and one truncated, one flipped copy of each
    root = tmp_path / "export"
    root.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for s in seeds:
        flipped = bytearray(s.data)
        for pos in rng.integers(132, len(flipped), 8):
            flipped[pos] ^= 0xFF
        for kind, data in (
            ("orig", s.data),
            ("trunc", s.data[: len(s.data) // 2]),
            ("flip", bytes(flipped)),
        ):
            name = f"f{s.number:02d}-{kind}.dcm"
            (root / name).write_bytes(data)
            names.append(name)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i, name in enumerate(names):
            w.writerow([name, i % 2])
    # Execute
    report = ingest(
        root,
        labels,
        tmp_path / "site",
        options=IngestOptions(prep=PREP, max_file_bytes=LIMIT),
    )
    # Assert: every file has an outcome, none an unexpected error, the image originals ingest
    assert len(report.outcomes) == len(names)
    assert all(o.reason is None or o.reason in REASONS for o in report.outcomes)
    originals = {o.rel_path: o.reason for o in report.outcomes if o.rel_path.endswith("-orig.dcm")}
    # (RT Dose and segmentation seeds decode but are not image SOP classes)
    assert set(originals.values()) <= {None, Reason.NON_IMAGE_SOP_CLASS.value}
    assert sum(r is None for r in originals.values()) >= len(seeds) - 3
