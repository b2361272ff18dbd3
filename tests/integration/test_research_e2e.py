"""The research workbench end to end on the real Fed-Heart-Disease data (4 hospitals).

One small ``medfed experiment`` (pooled + local baselines + one federated FedAvg run on
Flower's simulation engine, 3 rounds) whose federated run injects every fault kind:
dropout (p = 0.25, seed 41), a slow site (partition 0, +1 s) and a site that crashes
(partition 3) from round 2. Asserts that the run completes on the quorum, that
rounds.jsonl records every injected fault, that the results table has the ratios and that
``medfed report`` writes the plots and the page.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.faults import drops_out

pytestmark = pytest.mark.integration

MEDFED = str(Path(sys.executable).parent / "medfed")
SEED, DROPOUT, ROUNDS = 41, 0.25, 3


def _experiment_toml(data_dir: Path) -> str:
    return f"""
name = "heart-faults"
seeds = [{SEED}]
rounds = {ROUNDS}
[data]
kind = "heart"
dir = "{data_dir}"
[run-config]
task = "tabular"
model = "heart-logreg"
batch-size = 16
learning-rate = 0.01
fraction-evaluate = 0.0
dp.enabled = false
secagg.enabled = false
[[federated]]
label = "fedavg-faults"
strategy = "fedavg"
min-replies = 1
faults.dropout = {DROPOUT}
faults.slow-site = 0
faults.slow-seconds = 1.0
faults.crash-site = 3
faults.crash-round = 2
"""


def test_experiment_with_injected_faults_records_them_and_reports(tmp_path, shared_data_dir):
    # Prepare
    data_dir = shared_data_dir / "tabular" / "uci_heart_disease_4sites"
    config = tmp_path / "exp.toml"
    config.write_text(_experiment_toml(data_dir))
    out = tmp_path / "exp"
    env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0"}
    # Execute
    proc = subprocess.run(
        [MEDFED, "experiment", str(config), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    # Assert: the run finished and the results table has the ratios
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    run_row = next(r for r in rows if r["kind"] == "run")
    assert 0.0 < float(run_row["fed/pooled"]) < 2.0
    assert float(run_row["fed/best-local"]) > 0.0
    assert any(r["kind"] == "summary" for r in rows)
    # Assert: every injected fault is in the round log
    run_dir = Path(run_row["run-dir"])
    lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    rounds = {x["round"]: x for x in lines if x["round"] > 0}
    assert sorted(rounds) == [1, 2, 3]
    for r, line in rounds.items():
        dropped = {
            p
            for p in range(4)
            if drops_out(probability=DROPOUT, seed=SEED, server_round=r, partition_id=p)
        }
        crashed = {3} - dropped if r >= 2 else set()
        train = line["train"]
        assert len(train["dropped"]) == len(dropped), (r, train)
        assert len(train["failed"]) == len(crashed), (r, train)
        assert all("injected fault: crash" in v for v in train["failed"].values())
        assert len(train["replied"]) == 4 - len(dropped) - len(crashed)
        delays = [s.get("fault-delay-seconds") for s in train["sites"].values()]
        assert sorted(delays) == sorted(
            [1.0] * (0 not in dropped) + [0.0] * (len(delays) - (0 not in dropped))
        )
    assert (run_dir / "final_model.pt").is_file()
    # Assert: the reports exist and reference their plots
    run_page = (run_dir / "report" / "report.html").read_text()
    for name in ("metrics.png", "participation.png", "epsilon.png", "bytes.png", "time.png"):
        assert (run_dir / "report" / name).stat().st_size > 0
        assert f"src='{name}'" in run_page
    exp_page = (out / "report.html").read_text()
    assert "src='ratios.png'" in exp_page and (out / "ratios.png").stat().st_size > 0
