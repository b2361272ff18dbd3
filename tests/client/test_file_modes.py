"""Issue 16 item 6: patient data and site state are 0600 files in 0700 dirs, whatever the umask.

Site dataset (images, labels, groups, manifest), the ingest pixel cache and salt, the
privacy ledger and its key, the audit log and its head, the lock files, SCAFFOLD state
and the state dir itself. Each test runs under umask 0o022 (the usual default) and 0o000.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from client.data.dicom_read import Preprocessing
from client.data.ingest import IngestOptions, ingest
from client.privacy import PrivacyLedger
from client.scaffold import save_variate, variate_path
from client.site.audit import AuditLog
from common.site_dataset import SiteDataset

REAL_FILES = ("CT_small.dcm", "MR_small.dcm")


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """``{relative path: octal mode}`` of ``root`` and everything under it."""
    out = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob("*"):
        out[p.relative_to(root).as_posix()] = oct(stat.S_IMODE(p.lstat().st_mode))
    return out


def assert_private(root: Path) -> None:
    found = modes(root)
    wrong = {
        name: mode
        for name, mode in found.items()
        if mode != ("0o700" if (root / name).is_dir() else "0o600")
    }
    assert not wrong, f"not private under {root}: {wrong}"


def test_site_dataset_and_ingest_cache_are_private(
    shared_data_dir: Path, tmp_path: Path, umask: int
) -> None:
    # Prepare: two real DICOM files, labelled by path
    export = tmp_path / "export"
    export.mkdir()
    for name in REAL_FILES:
        src = shared_data_dir / "dicom" / "pydicom_3.0.2_test_files" / name
        if not src.is_file():
            pytest.fail(f"{src} missing from the shared data")
        shutil.copyfile(src, export / name)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nCT_small.dcm,0\nMR_small.dcm,1\n")
    opts = IngestOptions(
        prep=Preprocessing(size=8),
        cache_dir=tmp_path / "cache",
        val_fraction=0.0,
        workers=1,
        label_names=["normal", "abnormal"],
    )
    # Execute: a first ingest, then a --force replacement (both must be private)
    ingest(export, labels, tmp_path / "srv" / "site", options=opts)
    ingest(export, labels, tmp_path / "srv" / "site", options=replace(opts, overwrite=True))
    # Assert
    site = tmp_path / "srv" / "site"
    assert SiteDataset(site, verify=True).count("train") == 2
    assert {p.name for p in site.iterdir()} >= {"manifest.json", "train_images.npy"}
    assert_private(site)
    assert_private(tmp_path / "cache")  # pixel cache entries, their dirs, the site salt
    assert any(p.suffix == ".entry" for p in (tmp_path / "cache").rglob("*"))
    assert oct(stat.S_IMODE((tmp_path / "srv").stat().st_mode)) == "0o700"  # created by us


def test_ledger_audit_log_and_state_dir_are_private(tmp_path: Path, umask: int) -> None:
    state = tmp_path / "node" / "state"
    ledger = PrivacyLedger(state)
    ledger.update("project/dataset", {"history": [[1.0, 0.01, 5]], "plans": {}})
    ledger.update("project/dataset", {"history": [[1.0, 0.01, 10]], "plans": {}})
    AuditLog(state).append("train", steps=5)
    assert ledger.entry("project/dataset")["history"] == [[1.0, 0.01, 10]]
    assert AuditLog(state).verify() >= 3
    names = {p.name for p in state.iterdir()}
    assert {"audit.jsonl", "audit.head"} <= names and len(names) >= 5  # ledger, key, locks
    assert_private(state)
    assert oct(stat.S_IMODE((tmp_path / "node").stat().st_mode)) == "0o700"


def test_scaffold_state_is_private(tmp_path: Path, umask: int) -> None:
    path = variate_path(tmp_path / "state", "project/dataset")
    save_variate(path, {"w": torch.ones(3)})
    save_variate(path, {"w": torch.zeros(3)})  # replaced atomically, still private
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))
    assert_private(tmp_path / "state")
