"""Hospitals as DICOM: export -> deid-check -> ingest gives back the original pixels."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import typer
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from typer.testing import CliRunner

from client.data.deid import check_directory
from client.data.dicom_read import Preprocessing
from client.data.ingest import IngestOptions, ingest
from common.errors import DataError
from common.site_dataset import SiteDataset
from simulation.data.export_dicom import SITE_MANUFACTURERS, export_site_dicom, export_sites
from simulation.dicom_cli import register


@pytest.fixture(scope="module")
def pneumonia(pneumonia_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(pneumonia_npz) as npz:
        return npz["train_images"][:60].copy(), npz["train_labels"][:60].reshape(-1).copy()


def test_exported_files_are_valid_deidentified_dicom(
    pneumonia: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = pneumonia
    site = export_site_dicom(images[:10], labels[:10], tmp_path, manufacturer="Vendor X", seed=3)
    files = sorted(site.dicom_dir.iterdir())
    assert site.count == len(files) == 10
    ds = pydicom.dcmread(files[0])  # no force: a proper Part 10 file with preamble
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.Manufacturer == "Vendor X" and ds.Modality == "CR"
    assert np.array_equal(ds.pixel_array, images[0])
    with site.labels_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["label"]) for r in rows] == labels[:10].tolist()
    assert rows[0]["sop_instance_uid"] == ds.SOPInstanceUID
    assert len({r["sop_instance_uid"] for r in rows}) == 10
    # deid-check finds nothing in what export-dicom writes
    report = check_directory(site.dicom_dir)
    assert report.files_checked == 10 and not report.has_findings, report.to_dict()


def test_uids_are_reproducible_and_differ_between_sites(
    pneumonia: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = pneumonia
    a = export_site_dicom(images[:3], labels[:3], tmp_path / "a", manufacturer="M", seed=1)
    b = export_site_dicom(images[:3], labels[:3], tmp_path / "b", manufacturer="M", seed=1)
    c = export_site_dicom(images[:3], labels[:3], tmp_path / "c", manufacturer="M", seed=1, site=1)
    assert a.labels_csv.read_text() == b.labels_csv.read_text()
    assert a.labels_csv.read_text() != c.labels_csv.read_text()
    with pytest.raises(DataError, match="already holds"):
        export_site_dicom(images[:3], labels[:3], tmp_path / "a", manufacturer="M", seed=1)
    with pytest.raises(DataError, match="uint8"):
        export_site_dicom(
            images[:3].astype(np.float32), labels[:3], tmp_path / "d", manufacturer="M", seed=1
        )


def test_export_then_ingest_gives_back_the_same_pixels(
    pneumonia: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = pneumonia
    parts = [np.arange(0, 30), np.arange(30, 60)]
    sites = export_sites(images, labels, parts, tmp_path / "exports", seed=0)
    for s, (site, idx) in enumerate(zip(sites, parts, strict=True)):
        out = tmp_path / f"site_{s}"
        report = ingest(
            site.dicom_dir,
            site.labels_csv,
            out,
            options=IngestOptions(prep=Preprocessing(size=28), val_fraction=0.0, cache_dir=None),
        )
        assert report.ingested == 30 and report.quarantined == 0
        ds = SiteDataset(out, verify=True)
        arr = ds.load("train")
        # file order = export order, so arrays match one to one, bit for bit
        assert np.array_equal(arr.images[:, 0], images[idx].astype(np.float32) / 255)
        assert np.array_equal(arr.labels, labels[idx])
        assert len(np.unique(arr.groups)) == 30  # one (anonymous) patient per image
        summary = ds.manifest["summary"]
        # one manufacturer per site, counted as a category, never by its value
        (manufacturer,) = summary["by_manufacturer"]
        assert manufacturer.startswith("other #")
        assert SITE_MANUFACTURERS[s] not in str(ds.manifest)
        assert summary["deid"]["files_with_findings"] == 0


def test_cli_export_dicom(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(
        npz,
        train_images=rng.integers(0, 256, (9, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 2, (9, 1)),
    )
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # a group, as in the real `medfed` app
        """Test root."""

    register(app)
    args = ["export-dicom", "--data", str(npz), "--sites", "3", "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    counts = [len(list((tmp_path / "x" / f"site_{i}" / "dicom").iterdir())) for i in range(3)]
    assert counts == [3, 3, 3]
    bad = CliRunner().invoke(app, [*args[:-2], "--out", str(tmp_path / "y"), "--split", "test"])
    assert bad.exit_code == 2 and "test_images" in bad.output
