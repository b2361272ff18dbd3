"""SCAFFOLD on the real simulation engine: server and site control variates round-trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

MEDFED = str(Path(sys.executable).parent / "medfed")


def test_scaffold_run_learns_and_sites_keep_their_control_variates(tmp_path, pneumonia_npz):
    run_dir = tmp_path / "run"
    env = {**os.environ, "MEDFED_DATA_DIR": str(pneumonia_npz.parents[1]), "COLUMNS": "200"}
    proc = subprocess.run(
        [MEDFED, "simulate", "--sites", "3", "--alpha", "0.1", "--rounds", "2",
         "--run-dir", str(run_dir), "--set", "strategy=scaffold", "--set", "momentum=0",
         "--set", "learning-rate=0.1", "--set", "dp.enabled=false",
         "--set", "secagg.enabled=false"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    # every site trained in both rounds and sent model + control-variate delta
    assert [len(r["train"]["replied"]) for r in rounds[1:]] == [3, 3]
    assert rounds[-1]["global"]["accuracy"] > rounds[0]["global"]["accuracy"] + 0.05
    # each site's c_i lives in its own state dir, and is non-zero after training
    for site in range(3):
        files = list((run_dir / "state" / f"site-{site}").glob("scaffold-*.pt"))
        assert len(files) == 1
        c_i = torch.load(files[0], weights_only=True)
        assert any(v.abs().sum() > 0 for v in c_i.values())
    # bytes up include the delta: about twice the model's parameter bytes per site
    up = rounds[1]["train"]["bytes-up"]
    down = rounds[1]["train"]["bytes-down"]
    assert up > 1.5 * down / 2
