"""Ingestion of the real shared DICOM corpus, checked file by file against INVENTORY.json.

INVENTORY.json records what pydicom 3.0.2 (with the pixel handlers) does with every file:
``parse`` ok or the error, ``sop``, ``px`` (decoded shape, ``no pixels`` or the error).
Every file must end ingested or quarantined with the reason that fits that record.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from client.data.dicom_read import Preprocessing, Reason, discover_files
from client.data.ingest import FileOutcome, IngestOptions, IngestReport, ingest


@dataclass
class CorpusRun:
    root: Path
    report: IngestReport
    logs: str
    manifest_text: str
    inventory: dict[str, dict[str, Any]]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()}")


@pytest.fixture(scope="module")
def corpus(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CorpusRun:
    root = shared_data_dir / "dicom"
    inv_path = root / "INVENTORY.json"
    if not inv_path.is_file():
        pytest.fail(f"{inv_path} missing from the shared data")
    inventory = {e["file"]: e for e in json.loads(inv_path.read_text())}
    work = tmp_path_factory.mktemp("corpus")
    labels = work / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i, p in enumerate(discover_files(root)):
            w.writerow([p.relative_to(root).as_posix(), i % 2])
    capture = _Capture()
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(capture)
    root_logger.setLevel(logging.DEBUG)
    try:
        report = ingest(
            root,
            labels,
            work / "site",
            options=IngestOptions(prep=Preprocessing(size=16), cache_dir=work / "cache"),
        )
    finally:
        root_logger.removeHandler(capture)
        root_logger.setLevel(old_level)
    return CorpusRun(
        root=root,
        report=report,
        logs="\n".join(capture.lines),
        manifest_text=(work / "site" / "manifest.json").read_text(),
        inventory=inventory,
    )


def _non_image(sop: str) -> bool:
    return sop not in ("?", "") and "Image Storage" not in sop


def _expected(entry: dict[str, Any] | None, rel: str) -> set[str | None]:
    """Acceptable outcomes (None = ingested) for a file given its INVENTORY record."""
    if entry is None:  # LICENSE, INVENTORY.json: not DICOM at all
        return {Reason.NOT_DICOM.value}
    if not str(entry.get("parse", "")).startswith("ok"):
        return {Reason.MALFORMED_HEADER.value, Reason.TRUNCATED.value, Reason.NOT_DICOM.value}
    sop, px = str(entry.get("sop", "")), str(entry.get("px") or "")
    if "DICOMDIR" in rel:
        return {Reason.DICOMDIR.value}
    if _non_image(sop):
        return {Reason.NON_IMAGE_SOP_CLASS.value}
    if px == "no pixels":
        return {Reason.NO_PIXEL_DATA.value, Reason.NOT_DICOM.value, Reason.TRUNCATED.value}
    if px.startswith("ok"):
        return {None, Reason.DUPLICATE.value}
    # decoding failed in the inventory: the reason must name the failure
    if "less than expected" in px:
        return {Reason.TRUNCATED_PIXEL_DATA.value}
    if "(0002,0010)" in px and "file_meta" in px:
        return {Reason.MISSING_TRANSFER_SYNTAX.value}
    if "Missing required element" in px:
        return {Reason.MISSING_PIXEL_ATTRIBUTES.value}
    if px.startswith("FAIL NotImplementedError"):
        return {Reason.UNSUPPORTED_TRANSFER_SYNTAX.value}
    return {Reason.UNDECODABLE_PIXEL_DATA.value}


def test_every_file_is_ingested_or_quarantined_as_inventory_says(corpus: CorpusRun) -> None:
    outcomes = {o.rel_path: o for o in corpus.report.outcomes}
    on_disk = {p.relative_to(corpus.root).as_posix() for p in discover_files(corpus.root)}
    assert set(outcomes) == on_disk
    assert set(corpus.inventory) <= on_disk
    wrong = {}
    for rel, o in outcomes.items():
        ok = _expected(corpus.inventory.get(rel), rel)
        if o.reason not in ok:
            wrong[rel] = (o.reason, sorted(map(str, ok)))
    assert not wrong, wrong
    # every quarantine reason is a known code, every file is counted once
    reasons = {q["reason"] for q in json.loads(corpus.manifest_text)["quarantine"]}
    assert reasons <= {r.value for r in Reason}
    summary = corpus.report.manifest["summary"]
    assert summary["ingested"] + summary["quarantined"] == len(on_disk)


def test_duplicates_really_are_byte_identical_to_an_ingested_file(corpus: CorpusRun) -> None:
    digests: dict[str, FileOutcome] = {}
    for o in corpus.report.outcomes:
        digest = hashlib.sha256((corpus.root / o.rel_path).read_bytes()).hexdigest()
        if o.reason is None:
            digests.setdefault(digest, o)
        elif o.reason == Reason.DUPLICATE.value:
            assert digest in digests, o.number


def test_corpus_covers_the_hard_cases(corpus: CorpusRun) -> None:
    by_rel = {o.rel_path: o for o in corpus.report.outcomes}
    for rel in (
        "nibabel_5.4.2/philips_mprage.dcm.gz",  # gzipped, 176 frames, Enhanced MR
        "pydicom_3.0.2_test_files/zipMR.gz",
        "pydicom_3.0.2_test_files/dicomdirtests/98892003/MR700/4467",  # no extension
        "pydicom_data/HTJ2K_08_RGB.dcm",
        "pydicom_data/JLSL_16_15_1_1F.dcm",  # JPEG-LS, no preamble
        "pydicom_data/RG3_J2KI.dcm",
        "pydicom_3.0.2_test_files/MR_small_RLE.dcm",
    ):
        assert by_rel[rel].reason in (None, "duplicate"), (rel, by_rel[rel].reason)
    assert by_rel["nibabel_5.4.2/philips_mprage.dcm.gz"].samples == 176
    assert by_rel["pydicom_3.0.2_test_files/waveform_ecg.dcm"].reason == "non_image_sop_class"
    assert by_rel["pydicom_3.0.2_test_files/rtplan.dcm"].reason == "non_image_sop_class"
    assert by_rel["pydicom_3.0.2_test_files/badVR.dcm"].reason == "malformed_header"


def _phi_values(root: Path) -> set[str]:
    values: set[str] = set()
    for p in discover_files(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom would print header values
                ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
            for kw in ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate"):
                v = str(ds.get(kw, "") or "").strip()
                if len(v) >= 4:
                    values.add(v)
        except Exception:
            continue
    return values


def test_manifest_and_logs_hold_no_patient_values_or_paths(corpus: CorpusRun) -> None:
    # hex hashes could contain short digit runs by chance: compare outside them
    manifest = re.sub(r"[0-9a-f]{16,}", "#", corpus.manifest_text)
    texts = {"manifest": manifest, "logs": corpus.logs}
    values = _phi_values(corpus.root)
    assert values  # the corpus does carry identifiers
    paths = set()
    for o in corpus.report.outcomes:
        paths.add(o.rel_path)
        name = Path(o.rel_path).name
        if len(Path(name).stem) >= 6:
            paths.add(name)
    paths.add(str(corpus.root))
    for where, text in texts.items():
        leaked = sorted(v for v in values | paths if v in text)
        assert not leaked, f"{len(leaked)} identifying strings in the {where}"
    assert re.search(r"file #\d+ quarantined: \w+", corpus.logs)
