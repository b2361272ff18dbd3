"""De-identification check (PS3.15 Annex E): real identifying files, clean exports, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import typer
from pydicom.datadict import tag_for_keyword
from typer.testing import CliRunner

from client.cli import register
from client.data.deid import (
    ANNEX_E_KEYWORDS,
    check_dataset,
    check_directory,
    filename_findings,
)
from tests.client.test_dicom_read import make_dataset, write


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_every_annex_e_keyword_is_a_dicom_keyword() -> None:
    assert len(ANNEX_E_KEYWORDS) > 200
    assert all(tag_for_keyword(k) is not None for k in ANNEX_E_KEYWORDS)


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
