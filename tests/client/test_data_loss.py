"""Issue 16 item 1: `medfed ingest --force` replaces only a site dataset medfed wrote.

Real inputs: two files of the shared DICOM corpus copied into a hospital-like folder
(``export/``, ``labels.csv`` next to it, an unrelated ``other/`` folder). Every refusal
must leave every byte where it was.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner, Result

from client.cli import register
from common.errors import DataError
from common.site_dataset import SiteDataset, SplitArrays, write_site_dataset
from tests.sites import tiny_site

REAL_FILES = {
    "a/CT_small.dcm": ("pydicom_3.0.2_test_files/CT_small.dcm", 0),
    "b/MR_small.dcm": ("pydicom_3.0.2_test_files/MR_small.dcm", 1),
}


@dataclass(frozen=True)
class Hospital:
    root: Path
    export: Path
    labels: Path
    other: Path


@pytest.fixture
def hospital(shared_data_dir: Path, tmp_path: Path) -> Hospital:
    root = tmp_path / "hospital"
    export = root / "export"
    rows = ["path,label"]
    for rel, (src, label) in REAL_FILES.items():
        source = shared_data_dir / "dicom" / src
        if not source.is_file():
            pytest.fail(f"{source} missing from the shared data")
        (export / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, export / rel)
        rows.append(f"{rel},{label}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    other = root / "other"
    other.mkdir()
    (other / "notes.txt").write_text("an unrelated folder of the hospital\n")
    return Hospital(root=root, export=export, labels=labels, other=other)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def ingest_cli(h: Hospital, out: Path, *extra: str) -> Result:
    app = typer.Typer()
    register(app)
    args = [
        "ingest", str(h.export), "--labels", str(h.labels), "--out", str(out),
        "--size", "8", "--workers", "1", "--val-fraction", "0",
        "--label-names", "normal,abnormal", *extra,
    ]  # fmt: skip
    return CliRunner().invoke(app, args)


def words(result: Result) -> str:
    return " ".join(result.output.split())


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("export", "is the DICOM export itself"),
        ("root", "the DICOM export (.*) is inside --out"),  # export + labels + other/
        ("export/b", "is inside the DICOM export"),
        ("export/new-site", "is inside the DICOM export"),
    ],
)
def test_out_overlapping_the_export_is_refused_and_nothing_is_touched(
    hospital: Hospital, where: str, message: str
) -> None:
    # Prepare
    before = snapshot(hospital.root.parent)
    out = hospital.root if where == "root" else hospital.root / where
    # Execute
    result = ingest_cli(hospital, out, "--force")
    # Assert: refused with a clear message, every file still there, nothing created
    assert result.exit_code == 2, result.output
    assert re.search(message, words(result)), result.output
    assert "nothing was written or deleted" in words(result)
    assert snapshot(hospital.root.parent) == before
    assert not (hospital.root / "export" / "new-site").exists()


def test_labels_file_inside_out_is_refused(hospital: Hospital) -> None:
    meta = hospital.root / "meta"
    meta.mkdir()
    labels = meta / "labels.csv"
    hospital.labels.rename(labels)
    before = snapshot(hospital.root)
    moved = Hospital(hospital.root, hospital.export, labels, hospital.other)
    result = ingest_cli(moved, meta, "--force")
    assert result.exit_code == 2, result.output
    assert "labels file" in words(result) and "is inside --out" in words(result)
    assert snapshot(hospital.root) == before


def test_force_refuses_a_folder_medfed_did_not_write(hospital: Hospital) -> None:
    before = snapshot(hospital.root)
    result = ingest_cli(hospital, hospital.other, "--force")
    assert result.exit_code == 2, result.output
    assert "not a site dataset written by medfed" in words(result)
    assert "nothing was deleted" in words(result)
    assert snapshot(hospital.root) == before


def test_force_refuses_a_site_dataset_with_foreign_files_in_it(hospital: Hospital) -> None:
    site = tiny_site(hospital.root / "site")
    (site / "my-notes.txt").write_text("not medfed's")
    before = snapshot(site)
    result = ingest_cli(hospital, site, "--force")
    assert result.exit_code == 2, result.output
    assert "holds 1 entry besides the site dataset" in words(result)
    assert snapshot(site) == before


def test_existing_dataset_without_force_is_refused(hospital: Hospital) -> None:
    site = tiny_site(hospital.root / "site")
    before = snapshot(site)
    result = ingest_cli(hospital, site)
    assert result.exit_code == 2, result.output
    assert "already exists. Pass --force" in words(result)
    assert snapshot(site) == before


def test_force_replaces_a_previous_site_dataset_atomically(
    hospital: Hospital, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a real previous site dataset (other content) at --out
    site = tiny_site(hospital.root / "site")
    old_fingerprint = SiteDataset(site).fingerprint
    old_files = snapshot(site)
    seen: list[bool] = []
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        # when the new dataset moves in, the old one must still exist whole (aside)
        if Path(str(dst)) == site and ".tmp-" in Path(str(src)).name:
            kept = [
                p
                for p in site.parent.iterdir()
                if p.name.startswith(".site.old-") and snapshot(p) == old_files
            ]
            seen.append(bool(kept))
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    # Execute
    result = ingest_cli(hospital, site, "--force")
    # Assert: new dataset in place, old content gone, no temp or aside dirs left
    assert result.exit_code == 0, result.output
    assert seen == [True]
    new = SiteDataset(site, verify=True)
    assert new.fingerprint != old_fingerprint
    assert new.manifest["provenance"]["tool"] == "medfed ingest"
    assert new.count("train") == 2
    assert {p.name for p in site.iterdir()} == {
        "manifest.json",
        "train_images.npy",
        "train_labels.npy",
        "train_groups.npy",
    }
    leftovers = [p.name for p in hospital.root.iterdir() if p.name.startswith(".site")]
    assert leftovers == []
    # the export, the labels and the unrelated folder are untouched
    assert (hospital.other / "notes.txt").is_file() and hospital.labels.is_file()
    assert len(list(hospital.export.rglob("*.dcm"))) == 2


def _write(path: Path, value: float, *, overwrite: bool) -> dict[str, object]:
    return write_site_dataset(
        path,
        task="classification",
        label_names=["a", "b"],
        splits={"train": SplitArrays.create(np.full((3, 1, 4, 4), value, np.float32), [0, 1, 0])},
        preprocessing={},
        provenance={},
        overwrite=overwrite,
    )


@pytest.mark.parametrize("crash", ["while writing arrays", "while swapping in"])
def test_a_crash_keeps_the_old_dataset_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: str
) -> None:
    # Prepare
    site = tmp_path / "site"
    _write(site, 0.25, overwrite=False)
    before = snapshot(site)
    if crash == "while writing arrays":
        real_save = np.save
        calls = {"n": 0}

        def save(*args: object, **kwargs: object) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full")
            real_save(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(np, "save", save)
    else:
        real_rename = os.rename

        def rename(src: object, dst: object) -> None:
            if ".tmp-" in Path(str(src)).name:
                raise OSError("power cut")
            real_rename(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "rename", rename)
    # Execute
    with pytest.raises(OSError, match=r"disk full|power cut"):
        _write(site, 0.75, overwrite=True)
    monkeypatch.undo()
    # Assert: the old dataset is whole and readable; no temp dirs left
    assert snapshot(site) == before
    assert float(SiteDataset(site, verify=True).load("train").images[0, 0, 0, 0]) == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_write_site_dataset_refuses_non_medfed_directories(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"format": "someone-else"}')
    (folder / "train_images.npy").write_bytes(b"precious")
    with pytest.raises(DataError, match="not a site dataset written by medfed"):
        _write(folder, 0.5, overwrite=True)
    assert (folder / "train_images.npy").read_bytes() == b"precious"
