"""Hospital path end to end: PneumoniaMNIST -> DICOM files -> medfed ingest -> federated
training, compared with training on the same images straight from the npz."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

MEDFED = str(Path(sys.executable).parent / "medfed")


def _simulate(data_dir: Path, run_dir: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [MEDFED, "simulate", "--data-dir", str(data_dir), "--sites", "2", "--partition", "iid",
         "--rounds", "3", "--run-dir", str(run_dir), "--set", "dp.enabled=false",
         "--set", "local-epochs=2", "--set", "learning-rate=0.02", *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_training_on_ingested_dicom_matches_training_on_the_npz(tmp_path, pneumonia_npz):
    # Prepare: a 1,200-image subset of the real training split, the real val split
    data_dir = tmp_path / "data"
    (data_dir / "pneumoniamnist").mkdir(parents=True)
    with np.load(pneumonia_npz) as npz:
        np.savez(
            data_dir / "pneumoniamnist" / "pneumoniamnist.npz",
            train_images=npz["train_images"][:1200], train_labels=npz["train_labels"][:1200],
            val_images=npz["val_images"], val_labels=npz["val_labels"],
        )  # fmt: skip
        majority = float(np.mean(npz["val_labels"] == 1))
    # Execute
    direct = _simulate(data_dir, tmp_path / "direct")
    via = _simulate(data_dir, tmp_path / "via", "--via-dicom")
    # Assert: real DICOM files were written and ingested, nothing quarantined
    run = tmp_path / "via"
    assert len(list((run / "dicom-exports" / "site_0" / "dicom").rglob("*.dcm"))) == 600
    for site in ("site-0", "site-1"):
        manifest = json.loads((run / "sites" / site / "manifest.json").read_text())
        assert manifest["quarantine"] == []
        assert sum(s["count"] for s in manifest["splits"].values()) == 600
    # Same pixels and partition; only the local train/val split differs (ingest splits by
    # patient). Both federations learn, and agree closely: AUROC (threshold-free) within
    # 0.02, accuracy (one threshold, so noisier at 3 rounds) within 0.04.
    g_direct, g_via = direct[-1]["global"], via[-1]["global"]
    assert g_direct["accuracy"] > majority + 0.05 and g_via["accuracy"] > majority + 0.05
    assert abs(g_direct["auroc"] - g_via["auroc"]) <= 0.02, (g_direct, g_via)
    assert abs(g_direct["accuracy"] - g_via["accuracy"]) <= 0.04, (g_direct, g_via)
