"""``medfed report`` (simulation/research/report.py) on a hand-written run directory."""

import json
import re
from html import escape

import numpy as np
import pytest

from common.errors import DataNotFoundError
from common.site_dataset import SplitArrays, write_site_dataset
from simulation.research.report import (
    EXPERIMENT_PLOTS,
    RUN_PLOTS,
    write_experiment_report,
    write_run_report,
)


def _site(node, acc, eps):
    return {"num-examples": 10, "train-loss": 0.5, "epsilon": eps, "val-accuracy": acc}


def _round(r):
    sites = {"11": _site(11, 0.5 + 0.1 * r, 0.5 * r), "22": _site(22, 0.6, 0.4 * r)}
    return {
        "round": r,
        "global": {"accuracy": 0.6 + 0.05 * r, "auroc": 0.7},
        "wall-seconds": 2.0,
        "train": {
            "sampled": [11, 22, 33],
            "replied": [11, 22],
            "failed": {"33": "injected fault: crash"} if r == 2 else {},
            "dropped": [33] if r == 1 else [],
            "sites": sites,
            "metrics": {"train-loss": 0.5},
            "bytes-down": 3000,
            "bytes-up": 2000,
            "seconds": 1.0,
        },
        "evaluate": {
            "sampled": [11, 22],
            "replied": [11, 22],
            "sites": sites,
            "metrics": {"val-accuracy": 0.6},
            "bytes-down": 3000,
            "bytes-up": 0,
            "seconds": 0.5,
        },
    }


@pytest.fixture
def run_dir(tmp_path):
    lines = [{"round": 0, "global": {"accuracy": 0.5}}] + [_round(r) for r in (1, 2, 3)]
    (tmp_path / "rounds.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"model": "cnn", "strategy": "fedavg"}))
    images = np.zeros((4, 1, 2, 2), dtype=np.float32)
    write_site_dataset(
        tmp_path / "sites" / "site-0",
        task="classification",
        label_names=["normal", "pneumonia"],
        splits={"train": SplitArrays.create(images, np.array([0, 1, 1, 1]))},
        preprocessing={},
        provenance={},
    )
    return tmp_path


def test_run_report_writes_every_plot_and_the_page_references_them(run_dir):
    page = write_run_report(run_dir)
    html = page.read_text()
    for name in RUN_PLOTS:
        png = page.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000
        assert f"src='{name}'" in html
    assert "injected fault: crash" in html  # the failed site's reason
    assert "pneumonia: 3 (75%)" in html  # label balance from the site manifest
    assert re.search(r"<td>strategy</td><td>fedavg</td>", html)
    assert "NOT PRIVATE" not in html


def test_a_run_with_reproducible_noise_is_labelled_not_private(run_dir):
    # Prepare: the round log of a simulation with dp.reproducible-noise
    from server.runlog import DP_NOISE_REPRODUCIBLE
    from simulation.research.summary import read_rounds, summary_table

    lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for line in lines:
        line["dp-noise"] = DP_NOISE_REPRODUCIBLE
    (run_dir / "rounds.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    # Execute
    html = write_run_report(run_dir).read_text()
    table = summary_table(read_rounds(run_dir))
    # Assert: the report and the end-of-run table both say so
    assert "NOT PRIVATE" in html
    assert "NOT PRIVATE" in str(table.title)


def test_experiment_report_writes_ratio_plots_and_table(tmp_path):
    summary = {
        "kind": "summary",
        "split": "iid",
        "setting": "fedavg",
        "strategy": "fedavg",
        "dp": False,
        "seeds": 1,
        "max-epsilon": 0.0,
        "federated": 0.8,
        "pooled": 0.9,
        "best-local": 0.85,
        "fed/pooled": 0.8 / 0.9,
        "fed/best-local": 0.8 / 0.85,
    }
    summary |= {
        f"{k}-std": 0.0
        for k in ("federated", "pooled", "best-local", "fed/pooled", "fed/best-local")
    }
    (tmp_path / "results.json").write_text(json.dumps([summary]))
    page = write_experiment_report(tmp_path)
    html = page.read_text()
    for name in EXPERIMENT_PLOTS:
        assert (tmp_path / name).stat().st_size > 5000
        assert f"src='{name}'" in html
    assert "0.889" in html  # fed/pooled


def test_report_of_a_folder_without_a_round_log_explains(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"rounds\.jsonl"):
        write_run_report(tmp_path)


def test_site_validation_takes_folded_metrics_for_the_previous_rounds_model():
    from simulation.research.summary import site_validation

    # Prepare: evaluate-in-train: round r's train replies validated round r-1's model;
    # the final round also has its own evaluate exchange
    rounds = [
        {"round": 0, "global": {}},
        {"round": 1, "train": {"metrics": {"val-accuracy": 0.5, "train-loss": 1.0},
                               "sites": {"7": {"val-accuracy": 0.4}}}},
        {"round": 2, "train": {"metrics": {"val-accuracy": 0.6}, "sites": {}},
         "evaluate": {"metrics": {"val-accuracy": 0.7}, "sites": {"7": {"val-accuracy": 0.7}}}},
    ]  # fmt: skip
    # Execute
    validated = site_validation(rounds)
    # Assert
    assert validated[0]["metrics"] == {"val-accuracy": 0.5}
    assert validated[0]["sites"] == {"7": {"val-accuracy": 0.4}}
    assert validated[1]["metrics"] == {"val-accuracy": 0.6}
    assert validated[2]["metrics"] == {"val-accuracy": 0.7}


def _with_selection(run_dir, validated, best):
    """Add the ServerApp's model-selection entries to the round log (server/runlog.py)."""
    lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for line, scored, best_round in zip(lines, validated, best, strict=True):
        line["model-selection"] = {
            "metric": "val-balanced-accuracy",
            "goal": "max",
            "validated": scored,
            "best-round": best_round,
            "best-value": None if best_round is None else 0.9,
        }
    (run_dir / "rounds.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_end_of_run_table_and_report_say_which_round_is_the_best_model(run_dir):
    from rich.console import Console

    from simulation.research.summary import best_model_line, read_rounds, summary_table

    # Prepare: evaluate-in-train: round r's line validated round r-1's model
    _with_selection(
        run_dir,
        validated=[{}, {"0": 0.5}, {"1": 0.9}, {"2": 0.7, "3": 0.8}],
        best=[None, 0, 1, 1],
    )
    rounds = read_rounds(run_dir)
    # Execute
    console = Console(width=250, record=True)
    console.print(summary_table(rounds))
    text = console.export_text()
    html = write_run_report(run_dir).read_text()
    # Assert: one line for the CLI and the report, a score per round and a star on round 1
    line = best_model_line(rounds)
    assert line == "best model: round 1 (val-balanced-accuracy 0.9000) -> best_model.pt"
    assert "site balanced-accuracy" in text and "★" in text
    starred = [row for row in text.splitlines() if "★" in row and row.startswith("│")]
    assert len(starred) == 1 and starred[0].split("│")[1].strip() == "1"
    assert "0.9000" in starred[0]
    assert escape(line) in html
    assert "<td>1 (best)</td>" in html
    assert "model selection (val-balanced-accuracy)" in html


def test_a_run_without_any_site_validation_says_there_is_no_best_model(run_dir):
    from simulation.research.summary import best_model_line, read_rounds

    _with_selection(run_dir, validated=[{}, {}, {}, {}], best=[None] * 4)
    assert best_model_line(read_rounds(run_dir)).startswith("no best model")
    # and a run logged before model selection existed shows nothing about it
    lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    before = [{k: v for k, v in x.items() if k != "model-selection"} for x in lines]
    assert best_model_line(before) is None
