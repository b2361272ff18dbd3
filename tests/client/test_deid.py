"""De-identification check (PS3.15 Annex E): real identifying files, clean exports, CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import typer
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import BasicTextSRStorage, ImplicitVRLittleEndian
from typer.testing import CliRunner

from client.cli import register
from client.data.deid import (
    ANNEX_E_ACTIONS,
    ANNEX_E_EDITION,
    ANNEX_E_KEYWORDS,
    check_dataset,
    check_directory,
    filename_findings,
)
from client.data.ingest import ingest
from tests.client.test_dicom_ingest import image, opts, write_labels
from tests.client.test_dicom_read import make_dataset, write


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_every_annex_e_keyword_is_a_dicom_keyword() -> None:
    assert len(ANNEX_E_KEYWORDS) > 600  # Table E.1-1 of PS3.15 2026c: 652 tags + 3 masks
    assert all(tag_for_keyword(k) is not None for k in ANNEX_E_KEYWORDS)
    assert len(ANNEX_E_ACTIONS) >= len(ANNEX_E_KEYWORDS)


def test_real_file_with_identifiers_is_flagged(shared_data_dir: Path) -> None:
    ds = pydicom.dcmread(shared_data_dir / "dicom" / "pydicom_3.0.2_test_files" / "CT_small.dcm")
    assert str(ds.PatientName)  # the file does carry a name
    found = check_dataset(ds)
    assert {"PatientName", "PatientID", "StudyDate", "SOPInstanceUID"} <= found.attributes
    assert found.private_elements > 0
    assert found.has_findings


def test_real_directory_counts_attributes_per_file(shared_data_dir: Path, tmp_path: Path) -> None:
    src = shared_data_dir / "dicom" / "pydicom_3.0.2_test_files" / "dicomdirtests" / "77654033"
    report = check_directory(src)
    assert report.files_checked == report.files_seen == 7
    assert report.attributes["PatientName"] == 7
    assert not report.filename  # names are relative to the folder given
    parent = check_directory(src.parent)
    assert parent.filename["long_number"] >= 7  # "77654033/...": a record-number-like folder
    # CLI: JSON, counts only, exit 1
    result = CliRunner().invoke(_app(), ["deid-check", str(src), "--json"])
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["attributes"]["PatientID"] == 7
    values = {str(pydicom.dcmread(p).PatientID) for p in src.rglob("*") if p.is_file()}
    assert not any(v and v in result.stdout for v in values)


def test_private_tags_burned_in_annotation_and_file_names(tmp_path: Path) -> None:
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint8), BurnedInAnnotation="YES")
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "secret")
    found = check_dataset(ds)
    assert found.burned_in_annotation and found.private_elements == 2  # creator + element
    assert filename_findings("2019-03-04/scan.dcm") == {"date_like"}
    assert filename_findings("1.2.840.113619.2.55.3/img") == {"uid_like"}
    assert filename_findings("mrn_12345678.dcm") == {"long_number"}
    assert filename_findings("smith_john/ct.dcm", {"smith"}) == {"header_identifier"}
    assert filename_findings("site_0/dicom/img_00001.dcm", {"smith"}) == set()


def test_empty_type2_attributes_and_replaced_uids_are_not_findings(tmp_path: Path) -> None:
    ds = make_dataset(
        np.zeros((4, 4), dtype=np.uint8),
        PatientName="",
        PatientID="",
        StudyDate="",
        PatientIdentityRemoved="YES",
    )
    assert not check_dataset(ds).has_findings
    ds.PatientIdentityRemoved = "NO"
    assert check_dataset(ds).attributes == {
        "MediaStorageSOPInstanceUID",  # file meta (0002,0003): Table E.1-1 action U
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    }


def test_clean_directory_exits_0(tmp_path: Path) -> None:
    for i in range(3):
        ds = make_dataset(np.zeros((4, 4), dtype=np.uint8), PatientIdentityRemoved="YES")
        write(ds, tmp_path / "d" / f"img_{i}.dcm")
    result = CliRunner().invoke(_app(), ["deid-check", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "0 with findings" in result.output


def test_malformed_file_does_not_stop_the_check(shared_data_dir: Path, tmp_path: Path) -> None:
    src = shared_data_dir / "dicom" / "pydicom_3.0.2_test_files"
    for name in ("badVR.dcm", "bad_sequence.dcm", "MR_truncated.dcm", "no_meta.dcm"):
        if (src / name).is_file():
            shutil.copy(src / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("hello")
    report = check_directory(tmp_path)
    assert report.files_seen == len(list(tmp_path.iterdir()))
    assert report.files_checked >= 2


@pytest.mark.parametrize("attr", ["PatientBirthDate", "InstitutionName", "OtherPatientIDs"])
def test_each_identifying_attribute_is_reported(attr: str) -> None:
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint8), PatientIdentityRemoved="YES")
    setattr(ds, attr, "19700101" if "Date" in attr else "X Y")
    assert check_dataset(ds).attributes == {attr}


# ------------------------------------------------------------------- issue 16, item 2

#: Values that must never appear in any output (the test plants them in the headers).
NESTED_NAME = "Nested^Secret^Once"
DEEP_NAME = "Deeper^Secret^Twice"
PRIVATE_NAME = "Private^Secret^Thrice"
CREATOR = "MEDFED SECRET CREATOR"


def _nested_phi_file(src: Path, dst: Path, encoding: str) -> tuple[Path, str]:
    """A real corpus file whose PatientName is only inside sequence items (3 places).

    Returns the file and the private element's tag as ``(gggg,eeee)``.
    """
    ds = pydicom.dcmread(src)
    del ds.PatientName  # no top-level PatientName any more
    # one level deep, in a sequence that is not itself in Table E.1-1
    ds.AnatomicRegionSequence = Sequence([Dataset()])
    ds.AnatomicRegionSequence[0].PatientName = NESTED_NAME
    # two levels deep, in the second item
    deep = Dataset()
    deep.PurposeOfReferenceCodeSequence = Sequence([Dataset()])
    deep.PurposeOfReferenceCodeSequence[0].PatientName = DEEP_NAME
    ds.ReferencedSeriesSequence = Sequence([Dataset(), deep])
    ds.ReferencedSeriesSequence[0].SeriesDescription = ""  # an empty item attribute
    # inside a private sequence
    block = ds.private_block(0x0009, CREATOR, create=True)
    item = Dataset()
    item.PatientName = PRIVATE_NAME
    block.add_new(0x10, "SQ", Sequence([item]))
    private_tag = block.get_tag(0x10)
    if encoding in ("undefined_length", "implicit_undefined_length"):
        for elem in ds.iterall():
            if elem.VR == "SQ":
                elem.is_undefined_length = True
                for it in elem.value:
                    it.is_undefined_length_sequence_item = True
    if encoding.startswith("implicit"):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst, f"({private_tag >> 16:04X},{private_tag & 0xFFFF:04X})"


@pytest.mark.parametrize(
    "encoding", ["explicit", "undefined_length", "implicit", "implicit_undefined_length"]
)
def test_patient_name_only_inside_sequences_is_reported_with_its_path(
    shared_data_dir: Path, tmp_path: Path, encoding: str
) -> None:
    # Prepare: a real CT file, PatientName moved into sequence items (and a private one;
    # with Implicit VR the private sequence arrives as raw bytes of VR UN)
    src = shared_data_dir / "dicom" / "pydicom_3.0.2_test_files" / "CT_small.dcm"
    path, private = _nested_phi_file(src, tmp_path / "export" / "img.dcm", encoding)
    # Execute
    found = check_dataset(pydicom.dcmread(path))
    result = CliRunner().invoke(_app(), ["deid-check", str(path.parent), "--json"])
    table = CliRunner().invoke(_app(), ["deid-check", str(path.parent)])
    # Assert: paths of keywords and item indices, the private block by tag number
    assert "PatientName" in found.attributes
    assert "PatientName" not in found.top_level
    assert {
        "AnatomicRegionSequence[0] > PatientName",
        "ReferencedSeriesSequence[1] > PurposeOfReferenceCodeSequence[0] > PatientName",
        f"{private}[0] > PatientName",
    } <= set(found.nested)
    assert "PatientName" in found.only_nested
    assert f"({private[1:5]},{private[6:8]}xx)" in found.private_blocks
    assert result.exit_code == table.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["only_nested"]["PatientName"] == 1
    assert payload["files_only_nested"] == 1
    assert {
        "AnatomicRegionSequence[*] > PatientName",
        "ReferencedSeriesSequence[*] > PurposeOfReferenceCodeSequence[*] > PatientName",
        f"{private}[*] > PatientName",
    } <= set(payload["nested_paths"])
    assert "PatientName" in table.output and "Inside sequences" in table.output
    for text in (result.stdout, table.output, json.dumps(found.to_dict())):
        for secret in (NESTED_NAME, DEEP_NAME, PRIVATE_NAME, CREATOR, "Secret", "SECRET"):
            assert secret not in text


def test_deferred_private_sequence_is_parsed_not_left_as_bytes(
    shared_data_dir: Path, tmp_path: Path
) -> None:
    # Prepare: Implicit VR, so the private sequence is read as raw bytes (VR UN)
    src = shared_data_dir / "dicom" / "pydicom_3.0.2_test_files" / "CT_small.dcm"
    path, private = _nested_phi_file(src, tmp_path / "img.dcm", "implicit")
    ds = pydicom.dcmread(path)
    del ds.AnatomicRegionSequence, ds.ReferencedSeriesSequence  # leave the private one
    tag = int(private[1:5], 16) << 16 | int(private[6:10], 16)
    assert isinstance(ds.get_item(tag).value, bytes)  # what the old check stopped at
    # Execute
    found = check_dataset(ds)
    # Assert
    assert "PatientName" in found.attributes
    assert found.nested[f"{private}[0] > PatientName"] == 1
    assert "PatientName" not in found.top_level


@pytest.mark.parametrize(
    ("attr", "vr"),
    [
        ("ResponsiblePerson", "PN"),
        ("ResponsibleOrganization", "LO"),
        ("PatientTelecomInformation", "LT"),
        ("PatientInstitutionResidence", "LO"),
    ],
)
def test_basic_profile_attributes_missing_from_the_old_list_are_reported(
    attr: str, vr: str, tmp_path: Path
) -> None:
    # Prepare: a clean data set plus one Table E.1-1 attribute, top level and nested
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint8), PatientIdentityRemoved="YES")
    assert not check_dataset(ds).has_findings
    ds.add_new(tag_for_keyword(attr), vr, "Value That Must Not Show")
    # Execute
    found = check_dataset(ds)
    write(ds, tmp_path / "d" / "img.dcm")
    result = CliRunner().invoke(_app(), ["deid-check", str(tmp_path / "d"), "--json"])
    # Assert
    assert found.attributes == {attr}
    assert json.loads(result.stdout)["attributes"] == {attr: 1}
    assert "Must Not Show" not in result.stdout


def test_table_rows_pydicom_cannot_name_are_reported_by_tag_number() -> None:
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint8), PatientIdentityRemoved="YES")
    ds.add_new(0x00100012, "LT", "a name to use")  # new in PS3.15 2025+, X in Table E.1-1
    assert check_dataset(ds).attributes == {"(0010,0012)"}


def test_the_edition_is_named_in_help_and_report(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    help_text = CliRunner().invoke(_app(), ["deid-check", "--help"]).output
    payload = json.loads(
        CliRunner().invoke(_app(), ["deid-check", str(tmp_path / "d"), "--json"]).stdout
    )
    assert f"PS3.15 {ANNEX_E_EDITION}" in " ".join(help_text.split())
    assert f"PS3.15 {ANNEX_E_EDITION} Annex E Table E.1-1" in payload["profile"]
    assert "dicom-anonymizer" in payload["profile"]


def test_ingest_never_logs_or_stores_the_manufacturer_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a Manufacturer that names a hospital, on 2 images and 1 quarantined SR,
    # plus a known vendor; PatientName only inside a sequence on one image
    vendor = "St Elsewhere Radiology Workstation"
    d = tmp_path / "export"
    d.mkdir()
    rows = []
    for i, maker in enumerate((vendor, vendor, "GE MEDICAL SYSTEMS")):
        uid, data = image(40 * i, Manufacturer=maker)
        (d / f"img_{i}.dcm").write_bytes(data)
        rows.append((uid, i % 2))
    nested = pydicom.dcmread(d / "img_0.dcm")
    nested.AnatomicRegionSequence = Sequence([Dataset()])
    nested.AnatomicRegionSequence[0].PatientName = NESTED_NAME
    nested.save_as(d / "img_0.dcm", enforce_file_format=True)
    write(make_dataset(None, sop_class=BasicTextSRStorage, Manufacturer=vendor), d / "sr.dcm")
    labels = write_labels(tmp_path / "labels.csv", rows)
    # Execute
    with caplog.at_level(logging.DEBUG):
        report = ingest(d, labels, tmp_path / "site", options=opts(tmp_path))
    app = _app()
    cli_args = ["ingest", str(d), "-l", str(labels), "-o", str(tmp_path / "site2")]
    cli = CliRunner().invoke(app, [*cli_args, "--size", "8", "--workers", "1"])
    # Assert: a category (vendor family + salted hash) instead of the value, everywhere
    assert report.ingested == 3 and cli.exit_code == 0, cli.output
    texts = {
        "manifest": (tmp_path / "site" / "manifest.json").read_text(),
        "logs": caplog.text,
        "cli": cli.output,
        "cache": " ".join(
            p.read_bytes().decode("latin-1") for p in (tmp_path / "cache").rglob("*.entry")
        ),
    }
    for where, text in texts.items():
        for needle in ("Elsewhere", "Radiology Workstation", "GE MEDICAL", NESTED_NAME):
            assert needle not in text, f"{needle!r} found in {where}"
    summary = report.manifest["summary"]
    by_man = summary["by_manufacturer"]
    assert len(by_man) == 2
    (other,) = (k for k in by_man if k.startswith("other #"))
    (ge,) = (k for k in by_man if k.startswith("GE #"))
    assert by_man[other] == {"ingested": 2, "quarantined": 1}  # one manufacturer, 3 files
    assert by_man[ge] == {"ingested": 1}
    # the ingest summary runs the same check: the nested PatientName is counted
    assert summary["deid"]["only_nested"]["PatientName"] == 1
    assert summary["deid"]["nested_paths"]["AnatomicRegionSequence[*] > PatientName"] == 1
