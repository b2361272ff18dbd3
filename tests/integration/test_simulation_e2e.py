"""A real federated run: Flower simulation engine, real PneumoniaMNIST, real processes.

DP and secure aggregation are on (the defaults). With a fixed noise multiplier of 0.7,
batch size 64 and 2 local epochs per round, the sites of the seeded Dirichlet(0.5) split
(3077, 873 and 287 training images) reach the default site ceiling max-epsilon = 10 (site policy)
at different rounds
(see `medfed budget forecast`): the smallest site must refuse round 2 (before any
training step), and the run must carry on, securely aggregating the two other sites.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

MEDFED = str(Path(sys.executable).parent / "medfed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _medfed(*args, env, timeout):
    return subprocess.run([MEDFED, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_dp_simulation_beats_baseline_enforces_ceilings_and_cleans_up(tmp_path, pneumonia_npz):
    # Prepare
    run_dir = tmp_path / "run"
    env = {**os.environ, "MEDFED_DATA_DIR": str(pneumonia_npz.parents[1]), "COLUMNS": "200"}
    # Execute
    sim = _medfed(
        "simulate", "--sites", "3", "--partition", "dirichlet", "--alpha", "0.5",
        "--rounds", "2", "--run-dir", str(run_dir),
        "--set", "dp.noise-multiplier=0.7", "--set", "batch-size=64",
        "--set", "local-epochs=2",
        env=env, timeout=900,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    ev = _medfed(
        "evaluate", "--checkpoint", str(run_dir / "final_model.pt"),
        "--data", str(pneumonia_npz), "--split", "val",
        env=env, timeout=120,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]

    # Assert: the global model beats the majority-class baseline of the val split
    with np.load(pneumonia_npz) as npz:
        labels = npz["val_labels"]
    majority = max(np.mean(labels == 1), np.mean(labels == 0))
    assert metrics["num-images"] == 524
    assert metrics["accuracy"] > majority + 0.03
    assert metrics["auroc"] > 0.85
    # the round log and run directory are complete
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert len(list((run_dir / "checkpoints").glob("round-*.pt"))) == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-server-rounds"] == 2 and config["secagg.enabled"] is True
    # every reply reports a cumulative epsilon within the site ceiling (default 10)
    trained = [r["train"] for r in rounds[1:]]
    assert all(0 < s["epsilon"] <= 10 for t in trained for s in t["sites"].values())
    # sites refuse when their budget runs out; the refusal is logged; the run goes on
    assert [len(t["replied"]) for t in trained] == [3, 2]
    assert [len(t["failed"]) for t in trained] == [0, 1]
    assert all("privacy budget" in why for t in trained for why in t["failed"].values())
    assert all(t["bytes-up"] > 0 for t in trained)
    # the tables printed per-round global metrics and per-site epsilon
    assert "val AUROC" in sim.stdout and "epsilon" in sim.stdout
    # federated model selection through DP + SecAgg+: best_model.pt is the trained round
    # the round log names (round 1's model was validated in round 2's train replies)
    best = rounds[-1]["model-selection"]["best-round"]
    assert best in (1, 2)
    assert f"best model: round {best} (val-balanced-accuracy" in sim.stdout
    ev_best = _medfed(
        "evaluate", "--checkpoint", str(run_dir / "best_model.pt"),
        "--data", str(pneumonia_npz), "--split", "val",
        env=env, timeout=120,
    )  # fmt: skip
    assert ev_best.returncode == 0, ev_best.stderr
    assert json.loads(ev_best.stdout)["round"] == best
    # the background SuperLink was stopped
    pids = [int(p) for p in re.findall(r"\(pid (\d+)", sim.stdout + sim.stderr)]
    assert pids, "SuperLink pid not reported"
    assert not any(_alive(p) for p in pids)
