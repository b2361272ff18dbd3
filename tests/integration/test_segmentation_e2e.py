"""Real federated runs of the issue-7 models: U-Net on CHASE_DB1, GRU on MedMNIST.

Both with the defaults that matter: DP-SGD with the site ledger, SecAgg+ and the egress
guard. One round each (smoke); the accuracy runs are in bench/ and the slow tests.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MEDFED = str(Path(sys.executable).parent / "medfed")


def _medfed(*args, env, timeout):
    return subprocess.run([MEDFED, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_federated_unet_on_chase_with_dp_and_secagg(tmp_path, shared_data_dir):
    # Prepare
    run_dir = tmp_path / "seg"
    env = {**os.environ, "MEDFED_DATA_DIR": str(shared_data_dir), "COLUMNS": "200"}
    # Execute: --model unet selects task segmentation and dataset chase_db1
    sim = _medfed(
        "simulate", "--model", "unet", "--sites", "2", "--rounds", "1",
        "--run-dir", str(run_dir), env=env, timeout=600,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    ev = _medfed(
        "evaluate", "--checkpoint", str(run_dir / "final_model.pt"),
        "--data", str(run_dir / "sites" / "global-val"), env=env, timeout=120,
    )  # fmt: skip
    # Assert: config, privacy and secure aggregation were on
    config = json.loads((run_dir / "config.json").read_text())
    assert config["task"] == "segmentation" and config["dp.enabled"] and config["secagg.enabled"]
    last = _rounds(run_dir)[-1]
    sites = last["train"]["sites"].values()
    assert len(last["train"]["replied"]) == 2
    assert all(0 < s["epsilon"] <= 10 for s in sites)
    # Dice on the held-out children, at the server, at the sites and from the CLI
    assert 0.0 <= last["global"]["dice"] <= 1.0
    assert 0.5 < last["global"]["pixel-accuracy"] <= 1.0
    assert "val-dice" in last["evaluate"]["metrics"]
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)
    assert metrics["num-images"] == 4  # two held-out children, both eyes
    assert math.isclose(metrics["dice"], last["global"]["dice"], rel_tol=1e-6, abs_tol=1e-9)
    assert "val Dice" in sim.stdout


def test_federated_gru_on_row_sequential_images_with_dp(tmp_path, shared_data_dir):
    # BreastMNIST (546 training images) keeps this smoke run short; the PneumoniaMNIST
    # accuracy runs are in the issue report (same code path, larger file).
    run_dir = tmp_path / "gru"
    env = {**os.environ, "MEDFED_DATA_DIR": str(shared_data_dir), "COLUMNS": "200"}
    sim = _medfed(
        "simulate", "--model", "gru", "--dataset", "breastmnist", "--sites", "2",
        "--partition", "iid", "--rounds", "1", "--set", "batch-size=64",
        "--run-dir", str(run_dir), env=env, timeout=600,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    last = _rounds(run_dir)[-1]
    assert len(last["train"]["replied"]) == 2
    assert all(0 < s["epsilon"] <= 10 for s in last["train"]["sites"].values())
    assert 0.0 <= last["global"]["accuracy"] <= 1.0 and "auroc" in last["global"]


@pytest.mark.slow
def test_federated_unet_learns_vessels_without_dp(tmp_path, shared_data_dir):
    # 10 rounds x 2 local epochs, 3 sites (about 3 min on 2 idle cores): the issue-7 run
    # that reached Dice 0.57 on the held-out children (inter-observer 0.77).
    run_dir = tmp_path / "seg-long"
    env = {**os.environ, "MEDFED_DATA_DIR": str(shared_data_dir), "COLUMNS": "200"}
    sim = _medfed(
        "simulate", "--model", "unet", "--rounds", "10", "--run-dir", str(run_dir),
        "--set", "learning-rate=0.1", "--set", "local-epochs=2", "--set", "dp.enabled=false",
        env=env, timeout=1800,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    assert _rounds(run_dir)[-1]["global"]["dice"] > 0.4
