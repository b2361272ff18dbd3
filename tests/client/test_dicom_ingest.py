"""Ingestion on small synthetic exports: labels, patient splits, quarantine, cache, PHI."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import BasicTextSRStorage, generate_uid
from typer.testing import CliRunner

from client.data.dicom_read import Preprocessing
from client.data.ingest import IngestOptions, ingest, read_labels_csv
from common.errors import DataError
from common.site_dataset import SiteDataset
from tests.client.test_dicom_read import make_dataset, to_bytes, write

PHI_NAME = "DOE^JANE"
PHI_ID = "MRN12345678"


def write_labels(path: Path, rows: list[tuple[str, object]], key: str = "SOPInstanceUID") -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([key, "label"])
        w.writerows(rows)
    return path


def opts(tmp_path: Path, **kw: object) -> IngestOptions:
    base: dict[str, object] = {
        "prep": Preprocessing(size=8),
        "cache_dir": tmp_path / "cache",
        "val_fraction": 0.0,
        "overwrite": True,
    }
    base.update(kw)
    return IngestOptions(**base)  # type: ignore[arg-type]


def image(value: int, **attrs: object) -> tuple[str, bytes]:
    uid = generate_uid()
    ds = make_dataset(
        np.full((8, 8), value, dtype=np.uint8), SOPInstanceUID=uid, Modality="CR", **attrs
    )
    return uid, to_bytes(ds)


def export(tmp_path: Path, n: int, step: int) -> tuple[Path, Path]:
    """Write ``n`` single-valued images (value ``step * i``, label ``i % 2``) and labels."""
    d = tmp_path / "dicom"
    d.mkdir()
    rows = []
    for i in range(n):
        uid, data = image(step * i)
        (d / f"{i:02d}.dcm").write_bytes(data)
        rows.append((uid, i % 2))
    return d, write_labels(tmp_path / "labels.csv", rows)


def test_labels_by_sop_uid_and_split_by_patient(tmp_path: Path) -> None:
    # Prepare: 12 patients x 3 images; label = patient parity
    rows = []
    for p in range(12):
        for k in range(3):
            uid, data = image(10 * p + k, PatientID=f"PAT{p:03d}")
            (tmp_path / "dicom").mkdir(exist_ok=True)
            (tmp_path / "dicom" / f"{p}_{k}.dcm").write_bytes(data)
            rows.append((uid, p % 2))
    labels = write_labels(tmp_path / "labels.csv", rows)
    # Execute
    report = ingest(
        tmp_path / "dicom", labels, tmp_path / "site", options=opts(tmp_path, val_fraction=0.25)
    )
    # Assert
    site = SiteDataset(tmp_path / "site", verify=True)
    train, val = site.load("train"), site.load("val")
    assert len(train) + len(val) == 36 and report.ingested == 36
    assert set(train.groups.tolist()).isdisjoint(val.groups.tolist())
    assert len(np.unique(val.groups)) == 3  # 25 % of 12 patients
    for split in (train, val):
        _, counts = np.unique(split.groups, return_counts=True)
        assert set(counts.tolist()) == {3}  # a patient's 3 images stay together
    # pixel value 10p+k identifies the patient: its label must be p % 2
    for split in (train, val):
        p = np.rint(split.images[:, 0, 0, 0] * 255).astype(int) // 10
        assert np.array_equal(split.labels, p % 2)
    assert site.manifest["summary"]["by_split"]["val"]["files"] == 9


def test_every_file_ends_ingested_or_quarantined_with_a_reason(tmp_path: Path) -> None:
    d = tmp_path / "export"
    d.mkdir()
    good_uid, good = image(1)
    gz_uid, gz_data = image(2)
    _, unlabelled = image(3)
    (d / "good.dcm").write_bytes(good)
    (d / "copy_of_good").write_bytes(good)  # byte-identical
    (d / "zipped.gz").write_bytes(gzip.compress(gz_data))
    (d / "unlabelled.dcm").write_bytes(unlabelled)
    (d / "notes.txt").write_text("not an image\n" * 30)
    sr_uid = generate_uid()
    write(make_dataset(None, sop_class=BasicTextSRStorage, SOPInstanceUID=sr_uid), d / "sr.dcm")
    nopix_uid = generate_uid()
    write(make_dataset(None, SOPInstanceUID=nopix_uid), d / "nopix.dcm")
    (d / "truncated.dcm").write_bytes(good[: len(good) - 20])
    labels = write_labels(
        tmp_path / "labels.csv",
        [(good_uid, 0), (gz_uid, 1), (sr_uid, 0), (nopix_uid, 1)],
    )

    report = ingest(d, labels, tmp_path / "site", options=opts(tmp_path))

    by_name = {o.rel_path: o.reason for o in report.outcomes}
    assert by_name == {
        "copy_of_good": None,  # first in the sorted walk
        "good.dcm": "duplicate",
        "nopix.dcm": "no_pixel_data",
        "notes.txt": "not_dicom",
        "sr.dcm": "non_image_sop_class",
        "truncated.dcm": "truncated_pixel_data",
        "unlabelled.dcm": "unlabelled",
        "zipped.gz": None,
    }
    m = report.manifest
    assert {q["reason"] for q in m["quarantine"]} == {v for v in by_name.values() if v}
    assert all(q["input"] and isinstance(q["file"], int) for q in m["quarantine"])
    assert m["summary"]["by_outcome"]["ingested"] == 2


def test_nothing_usable_raises_and_cli_exits_1(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    labels = write_labels(tmp_path / "labels.csv", [("1.2.3", 0)])
    with pytest.raises(DataError, match="no usable image"):
        ingest(tmp_path / "d", labels, tmp_path / "site", options=opts(tmp_path))
    assert not (tmp_path / "site").exists()

    import typer

    from client.cli import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(
        app,
        ["ingest", str(tmp_path / "d"), "--labels", str(labels), "--out", str(tmp_path / "s2")],
    )
    assert result.exit_code == 1, result.output


def test_cached_rerun_reuses_work_and_gives_identical_arrays(tmp_path: Path) -> None:
    d, labels = export(tmp_path, 6, 40)
    first = ingest(d, labels, tmp_path / "s1", options=opts(tmp_path))
    second = ingest(d, labels, tmp_path / "s2", options=opts(tmp_path))
    assert first.cache_hits == 0 and second.cache_hits == 6
    a, b = SiteDataset(tmp_path / "s1").load("train"), SiteDataset(tmp_path / "s2").load("train")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert first.manifest["fingerprint"] == second.manifest["fingerprint"]
    # a damaged cache entry is recomputed, not trusted
    for entry in (tmp_path / "cache").rglob("*.entry"):
        entry.write_bytes(entry.read_bytes()[:40])
    third = ingest(d, labels, tmp_path / "s3", options=opts(tmp_path))
    assert third.cache_hits == 0
    assert np.array_equal(SiteDataset(tmp_path / "s3").load("train").images, a.images)
    # other preprocessing -> other cache entries
    fourth = ingest(d, labels, tmp_path / "s4", options=opts(tmp_path, prep=Preprocessing(size=4)))
    assert fourth.cache_hits == 0


def test_two_workers_match_one(tmp_path: Path) -> None:
    d, labels = export(tmp_path, 10, 20)
    one = ingest(d, labels, tmp_path / "s1", options=opts(tmp_path, cache_dir=None, workers=1))
    two = ingest(d, labels, tmp_path / "s2", options=opts(tmp_path, cache_dir=None, workers=2))
    assert [o.reason for o in one.outcomes] == [o.reason for o in two.outcomes]
    a, b = SiteDataset(tmp_path / "s1").load("train"), SiteDataset(tmp_path / "s2").load("train")
    assert np.array_equal(a.images, b.images)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_decoder_that_kills_its_worker_costs_only_its_own_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # Prepare: 10 images; the bytes of one make decoding abort its process, as a native
    # decoder does on some hostile headers (SIGABRT: no except clause can catch it)
    import client.data.ingest as ingest_module

    d, labels = export(tmp_path, 10, 20)
    poison = (d / "03.dcm").read_bytes()
    decode = ingest_module._process_bytes

    def aborting(data: bytes, *args: object) -> object:
        if data == poison:
            os.abort()
        return decode(data, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest_module, "_process_bytes", aborting)  # inherited by fork
    # Execute
    report = ingest(
        d, labels, tmp_path / "site", options=opts(tmp_path, cache_dir=None, workers=workers)
    )
    # Assert: that file is quarantined with its reason, every other file is ingested
    reasons = [o.reason for o in report.outcomes]
    assert reasons.count("decoder_crashed") == 1, reasons
    assert report.ingested == 9 and len(SiteDataset(tmp_path / "site").load("train")) == 9


def test_labels_csv_keys_and_errors(tmp_path: Path) -> None:
    salt = b"s" * 32
    acc = tmp_path / "acc.csv"
    acc.write_text("AccessionNumber,label\nA1,normal\nA2,pneumonia\n")
    table = read_labels_csv(acc, salt=salt)
    assert table.key == "accession_number" and table.label_names == ["normal", "pneumonia"]
    named = read_labels_csv(acc, salt=salt, label_names=["pneumonia", "normal"])
    assert sorted(named.labels.values()) == [0, 1]

    conflict = tmp_path / "conflict.csv"
    conflict.write_text("path,label\na/b.dcm,0\na/b.dcm,1\n")
    with pytest.raises(DataError, match="row 3"):
        read_labels_csv(conflict, salt=salt)
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("path,diagnosis\na,0\n")
    with pytest.raises(DataError, match="label"):
        read_labels_csv(nolabel, salt=salt)
    nokey = tmp_path / "nokey.csv"
    nokey.write_text("name,label\nx,0\n")
    with pytest.raises(DataError, match="key column"):
        read_labels_csv(nokey, salt=salt)


def test_accession_and_path_keys_find_the_files(tmp_path: Path) -> None:
    d = tmp_path / "dicom"
    (d / "sub").mkdir(parents=True)
    _, a = image(10, AccessionNumber="ACC1")
    _, b = image(20, AccessionNumber="ACC2")
    (d / "sub" / "a").write_bytes(a)
    (d / "b.dcm").write_bytes(b)
    acc = tmp_path / "acc.csv"
    acc.write_text("AccessionNumber,label\nACC1,0\nACC2,1\n")
    r1 = ingest(d, acc, tmp_path / "s1", options=opts(tmp_path))
    path = tmp_path / "path.csv"
    path.write_text("path,label\nsub/a,0\nb.dcm,1\n")
    r2 = ingest(d, path, tmp_path / "s2", options=opts(tmp_path))
    assert r1.ingested == r2.ingested == 2
    assert np.array_equal(
        SiteDataset(tmp_path / "s1").load("train").labels,
        SiteDataset(tmp_path / "s2").load("train").labels,
    )


def test_no_phi_in_manifest_cache_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: identifying header values and an identifying file name
    d = tmp_path / "export" / "DOE_JANE_MRN12345678"
    d.mkdir(parents=True)
    rows = []
    for i in range(3):
        uid, data = image(
            30 * i, PatientName=PHI_NAME, PatientID=PHI_ID, InstitutionName="St Example Hospital"
        )
        (d / f"{PHI_ID}_{i}.dcm").write_bytes(data)
        rows.append((uid, i % 2))
    sr = make_dataset(None, sop_class=BasicTextSRStorage, PatientName=PHI_NAME, PatientID=PHI_ID)
    write(sr, d / f"{PHI_ID}_report.dcm")
    labels = write_labels(tmp_path / "labels.csv", rows)
    # Execute
    with caplog.at_level(logging.DEBUG):
        report = ingest(tmp_path / "export", labels, tmp_path / "site", options=opts(tmp_path))
    # Assert
    assert report.ingested == 3
    texts = {
        "manifest": (tmp_path / "site" / "manifest.json").read_text(),
        "logs": caplog.text,
        "cache": " ".join(
            p.read_bytes().decode("latin-1") for p in (tmp_path / "cache").rglob("*.entry")
        ),
    }
    needles = [PHI_ID, "DOE", "JANE", "St Example", "export", str(tmp_path), *[u for u, _ in rows]]
    for where, text in texts.items():
        for needle in needles:
            assert needle not in text, f"{needle!r} found in {where}"
    deid_summary = report.manifest["summary"]["deid"]
    assert deid_summary["attributes"]["PatientName"] == 4
    assert deid_summary["filename_identifiers"]["header_identifier"] == 4
    assert "quarantined: non_image_sop_class" in caplog.text
    json.loads(texts["manifest"])


def test_cli_ingest_prints_tables_without_file_names(tmp_path: Path) -> None:
    import typer

    from client.cli import register

    d = tmp_path / "secret_patient_folder"
    d.mkdir()
    rows = []
    for i in range(4):
        uid, data = image(50 * i)
        (d / f"secret_{i}.dcm").write_bytes(data)
        rows.append((uid, i % 2))
    (d / "secret_notes.txt").write_text("x" * 500)
    labels = write_labels(tmp_path / "labels.csv", rows)
    app = typer.Typer()
    register(app)
    out = tmp_path / "site"
    args = ["ingest", str(d), "-l", str(labels), "-o", str(out), "--size", "8", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "not_dicom" in result.output and "secret" not in result.output
    assert SiteDataset(out).count("train") + SiteDataset(out).count("val") == 4
    shutil.rmtree(out)
    result = CliRunner().invoke(app, [*args, "--json"])
    assert json.loads(result.stdout)["ingested"] == 4


def test_the_patient_split_depends_on_the_seed_not_on_the_site_salt(tmp_path: Path) -> None:
    # Prepare: 20 patients x 2 images; two fresh sites (different random salts), same seed
    d = tmp_path / "dicom"
    d.mkdir()
    rows = []
    for p in range(20):
        for k in range(2):
            uid, data = image(10 * p + k, PatientID=f"PAT{p:03d}")
            (d / f"{p:02d}_{k}.dcm").write_bytes(data)
            rows.append((uid, p % 2))
    labels = write_labels(tmp_path / "labels.csv", rows)
    # Execute
    for n in (1, 2):
        ingest(
            d, labels, tmp_path / f"s{n}",
            options=opts(tmp_path, cache_dir=None, val_fraction=0.3, seed=7),
        )  # fmt: skip
    # Assert: identical arrays in both splits, although the salted patient keys differ
    # (without a cache directory every ingest draws a fresh random salt)
    a, b = SiteDataset(tmp_path / "s1"), SiteDataset(tmp_path / "s2")
    for split in ("train", "val"):
        x, y = a.load(split), b.load(split)
        assert np.array_equal(x.images, y.images) and np.array_equal(x.groups, y.groups)
