"""A real federated run: Flower simulation engine, real PneumoniaMNIST, real processes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MEDFED = str(Path(sys.executable).parent / "medfed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_small_simulation_beats_majority_baseline_and_cleans_up(tmp_path, pneumonia_npz):
    # Prepare
    run_dir = tmp_path / "run"
    env = {**os.environ, "MEDFED_DATA_DIR": str(pneumonia_npz.parents[1]), "COLUMNS": "200"}
    # Execute
    sim = subprocess.run(
        [
            MEDFED,
            "simulate",
            "--sites",
            "3",
            "--partition",
            "dirichlet",
            "--alpha",
            "0.5",
            "--rounds",
            "3",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    ev = subprocess.run(
        [
            MEDFED,
            "evaluate",
            "--checkpoint",
            str(run_dir / "final_model.pt"),
            "--data",
            str(pneumonia_npz),
            "--split",
            "val",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]

    # Assert: the global model beats the majority-class baseline of the val split
    import numpy as np

    with np.load(pneumonia_npz) as npz:
        majority = max(np.mean(npz["val_labels"] == 1), np.mean(npz["val_labels"] == 0))
    assert metrics["num-images"] == 524
    assert metrics["accuracy"] > majority + 0.05
    assert metrics["auroc"] > 0.85
    # the round log and run directory are complete
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(len(r["train"]["replied"]) == 3 and not r["train"]["dropped"] for r in rounds[1:])
    assert all(r["train"]["bytes-up"] > 0 for r in rounds[1:])
    assert len(list((run_dir / "checkpoints").glob("round-*.pt"))) == 3
    assert json.loads((run_dir / "config.json").read_text())["num-server-rounds"] == 3
    # the table printed per round global accuracy
    assert "val AUROC" in sim.stdout
    # the background SuperLink was stopped
    pids = [int(p) for p in re.findall(r"\(pid (\d+)", sim.stdout + sim.stderr)]
    assert pids, "SuperLink pid not reported"
    assert not any(_alive(p) for p in pids)
