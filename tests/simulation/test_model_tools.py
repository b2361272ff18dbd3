"""Model card from a run directory, and the report's explain figure (research/model_tools.py)."""

from __future__ import annotations

import hashlib
import json
import shutil

import matplotlib.image as mpimg
import pytest

from common.site_dataset import SplitArrays, write_site_dataset
from simulation.research.model_tools import config_hash, model_card, report_explain, site_summary
from simulation.research.report import write_run_report
from tests.checkpoints import tiny_checkpoint

RUN_CONFIG = {"model": "cnn", "num-server-rounds": 2, "dp.enabled": True, "seed": 1}


def _train_site(examples, eps, delta):
    return {"num-examples": examples, "epsilon": eps, "delta": delta, "train-loss": 0.5}


def _rounds(dp=True):
    def site(examples, eps, delta):
        s = _train_site(examples, eps, delta)
        return s if dp else {k: v for k, v in s.items() if k not in ("epsilon", "delta")}

    return [
        {"round": 0, "global": {"accuracy": 0.5}},
        {
            "round": 1,
            "dp-noise": "site-secret",
            "train": {"sites": {"11": site(80, 1.5, 1e-4), "22": site(20, 2.0, 1e-3)}},
        },
        {
            "round": 2,
            "dp-noise": "site-secret",
            "train": {"sites": {"11": site(80, 2.5, 1e-4)}},
            "evaluate": {"metrics": {"val-accuracy": 0.75}, "sites": {}},
        },
        {"round": 3, "train": {"sites": {"11": site(80, 9.0, 1e-4)}}},  # after the checkpoint
    ]


def _run_dir(tmp_path, rounds):
    run = tmp_path / "run"
    run.mkdir()
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (run / "config.json").write_text(json.dumps(RUN_CONFIG))
    return run


def test_card_takes_sites_privacy_and_hash_from_the_run_directory(tmp_path):
    run = _run_dir(tmp_path, _rounds())
    path = run / "checkpoints" / "round-002.pt"
    ckpt = tiny_checkpoint(path, round_=2, run_config=RUN_CONFIG, metrics={"accuracy": 0.8})
    card = model_card(ckpt, path)
    assert card["run-dir"] == str(run) and card["sites-note"] is None
    assert card["sites"] == {
        "11": {"train-examples": 80, "epsilon": 2.5, "delta": 1e-4, "rounds-trained": 2,
               "last-round": 2},
        "22": {"train-examples": 20, "epsilon": 2.0, "delta": 1e-3, "rounds-trained": 1,
               "last-round": 1},
    }  # fmt: skip
    canonical = json.dumps(RUN_CONFIG, sort_keys=True, separators=(",", ":"))
    assert card["config-hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert card["config-hash"] == config_hash(dict(reversed(RUN_CONFIG.items())))  # key order
    assert card["threshold"] == 0.5 and card["threshold-source"] == "default"
    assert card["round"] == 2 and card["num-server-rounds"] == 2
    assert card["validation-metrics"]["held-out"] == {"accuracy": 0.8}
    assert card["validation-metrics"]["sites"] == {"val-accuracy": 0.75}
    assert card["privacy"]["dp-noise"] == ["site-secret"]
    assert card["versions"]["torch"] and card["versions"]["medfed"]
    assert card["label-names"] == ["normal", "pneumonia"]


def test_card_says_why_privacy_is_unknown(tmp_path):
    alone = tmp_path / "elsewhere" / "model.pt"
    ckpt = tiny_checkpoint(alone, run_config=RUN_CONFIG)
    card = model_card(ckpt, alone)
    assert card["run-dir"] is None and card["sites"] is None
    assert "no rounds.jsonl" in card["sites-note"]
    assert card["config-hash-source"] == "checkpoint run-config"
    run = _run_dir(tmp_path, _rounds(dp=False))
    ckpt = tiny_checkpoint(run / "final_model.pt", round_=2)
    card = model_card(ckpt, run / "final_model.pt")
    assert card["sites"]["11"]["epsilon"] is None
    assert card["sites-note"] == "DP was off in this run: no epsilon/delta in the round log"
    assert card["config-hash-source"] == "run directory config.json"  # checkpoint has none


def test_site_summary_ignores_rounds_after_the_checkpoint():
    assert site_summary(_rounds(), 1)["11"]["epsilon"] == 1.5
    assert site_summary(_rounds(), 3)["11"]["epsilon"] == 9.0
    assert site_summary(_rounds(), 0) == {}


@pytest.fixture
def run_with_model(tmp_path, pneumonia_npz):
    from simulation.data.datasets import load_medmnist_split, to_model_images

    run = _run_dir(tmp_path, _rounds()[:3])
    raw, labels = load_medmnist_split(pneumonia_npz, "val")
    write_site_dataset(
        run / "sites" / "global-val",
        task="classification",
        label_names=["normal", "pneumonia"],
        splits={"val": SplitArrays.create(to_model_images(raw[:40]), labels[:40])},
        preprocessing={},
        provenance={},
    )
    tiny_checkpoint(run / "final_model.pt", round_=2)
    return run


def test_report_shows_an_explain_figure_of_the_final_model(run_with_model):
    page = write_run_report(run_with_model)
    assert "<img src='explain.png'" in page.read_text()
    png = mpimg.imread(page.parent / "explain.png")
    assert png[..., :3].std() > 0.1
    record = json.loads((page.parent / "explain.json").read_text())
    assert record["checkpoint"] == "final_model.pt" and len(record["items"]) == 8
    assert {i["correct"] for i in record["items"]} == {True, False}


def test_report_explain_prefers_best_model_and_skips_without_data(run_with_model, tmp_path):
    tiny_checkpoint(run_with_model / "best_model.pt", seed=1)
    out = tmp_path / "out"
    assert report_explain(run_with_model, out, n=2) == ["explain.png"]
    assert json.loads((out / "explain.json").read_text())["checkpoint"] == "best_model.pt"
    shutil.rmtree(run_with_model / "sites" / "global-val")
    assert report_explain(run_with_model, tmp_path / "none", n=2) == []
    assert not (tmp_path / "none").exists()
