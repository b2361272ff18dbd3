"""A real federated run with secure aggregation: Flower simulation engine, real data.

Marked slow (about 2 minutes on 2 cores): the default integration test already runs with
the run-config defaults, which include secure aggregation once ``secagg.enabled`` is on.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEDFED = str(Path(sys.executable).parent / "medfed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_simulation_with_secure_aggregation_learns_and_uploads_only_masked_uint32(
    tmp_path, pneumonia_npz
):
    # Prepare
    run_dir = tmp_path / "run"
    env = {**os.environ, "MEDFED_DATA_DIR": str(pneumonia_npz.parents[1]), "COLUMNS": "200"}
    # Execute
    sim = subprocess.run(
        [
            MEDFED, "simulate", "--sites", "3", "--partition", "dirichlet", "--alpha", "0.5",
            "--rounds", "2", "--run-dir", str(run_dir), "--set", "secagg.enabled=true",
        ],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    ev = subprocess.run(
        [
            MEDFED, "evaluate", "--checkpoint", str(run_dir / "final_model.pt"),
            "--data", str(pneumonia_npz), "--split", "val",
        ],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)
    secagg = [json.loads(x) for x in (run_dir / "secagg.jsonl").read_text().splitlines()]
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]

    # Assert: both rounds were securely aggregated over all three sites
    from common import secure_sum
    from common.config import RunConfig
    from common.models import get_model

    state = get_model("cnn").state_dict()
    # the model's float entries plus the secure sums (the validation score histogram)
    n_params = sum(v.numel() for v in state.values() if v.is_floating_point())
    n_params += secure_sum.length(secure_sum.spec(RunConfig()))
    assert json.loads((run_dir / "config.json").read_text())["secagg.enabled"] is True
    # two training rounds, then the final model's validate-only round (no training)
    assert [(r["purpose"], r["status"]) for r in secagg] == [
        ("train", "ok"), ("train", "ok"), ("validate", "ok"),
    ]  # fmt: skip
    assert all(len(r["survivors"]) == 3 and not r["excluded"] for r in secagg)
    # each site uploaded ~4 bytes per parameter in all four stages together
    for r in secagg:
        assert r["masked-length"] == n_params
        assert 4.0 <= r["bytes-up"] / (3 * r["masked-length"]) <= 4.2
    # the strategy and round log saw ordinary replies with the sites' own metrics
    assert all(len(r["train"]["replied"]) == 3 for r in rounds[1:])
    assert all(
        s["secagg-bytes-up"] > 4 * n_params
        for r in rounds[1:]
        for s in r["train"]["sites"].values()
    )
    # the final model has an operating point from the securely summed histograms
    from common.checkpoint import load_checkpoint

    final = load_checkpoint(run_dir / "final_model.pt")
    assert final.operating_point is not None
    assert final.operating_point["round"] == 2
    assert final.operating_point["validation_examples"] > 0
    assert len(rounds[-1]["evaluate"]["replied"]) == 3
    # and the securely aggregated model learned
    with np.load(pneumonia_npz) as npz:
        labels = npz["val_labels"]
    majority = max(np.mean(labels == 1), np.mean(labels == 0))
    assert metrics["accuracy"] > majority + 0.05
    # the background SuperLink was stopped
    pids = [int(p) for p in re.findall(r"\(pid (\d+)", sim.stdout + sim.stderr)]
    assert pids and not any(_alive(p) for p in pids)
