"""Federated model selection (server/selection.py) and its round log / best_model.pt."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Strategy

from common.checkpoint import load_checkpoint
from common.config import RunConfig
from common.models import get_model
from common.records import state_to_record
from server.runlog import RecordingStrategy
from server.selection import BEST_MODEL, attribute, resolve_metric, select_best

BAL = "val-balanced-accuracy"


# --------------------------------------------------------------- pure functions
def test_best_round_is_the_highest_score_and_ties_go_to_the_later_round():
    # Prepare: hand-made aggregated validation of the global model of each round
    scores = {
        0: {BAL: 0.50},
        1: {BAL: 0.71},
        2: {BAL: 0.93},
        3: {BAL: 0.88},
        4: {BAL: 0.93},  # ties round 2: the later (more trained) model wins
        5: {BAL: math.nan},  # no site defined it
    }
    # Execute
    best = select_best(scores, metric=BAL)
    # Assert
    assert best is not None
    assert (best.round, best.value, best.metric) == (4, 0.93, BAL)


def test_loss_is_minimised():
    scores = {
        1: {"val-loss": 0.61, BAL: 0.9},
        2: {"val-loss": 0.42, BAL: 0.7},
        3: {"val-loss": 0.5},
    }
    best = select_best(scores, metric="val-loss")
    assert best is not None and best.round == 2
    assert select_best(scores, metric=BAL).round == 1


def test_round_zero_only_when_no_trained_round_has_a_score():
    assert select_best({0: {BAL: 0.9}, 1: {BAL: 0.1}}, metric=BAL).round == 1
    fallback = select_best({0: {BAL: 0.5}, 1: {BAL: math.nan}, 2: {}}, metric=BAL)
    assert fallback is not None and fallback.round == 0
    assert select_best({1: {"val-loss": 0.3}}, metric=BAL) is None
    assert select_best({}, metric=BAL) is None


def test_train_phase_validation_describes_the_previous_rounds_model():
    # Prepare: evaluate-in-train: round 3's train replies validated the model they
    # received (round 2's); the final evaluate exchange validated round 3's own model
    train = {"num-examples": 400.0, "train-loss": 0.3, BAL: 0.8, "val-num-examples": 40.0}
    evaluate = {"num-examples": 40.0, BAL: 0.85, "val-loss": 0.4}
    # Execute
    got = attribute(3, train=train, evaluate=evaluate)
    # Assert: only val-* metrics, with the validation count under val-num-examples
    assert got == {
        2: {BAL: 0.8, "val-num-examples": 40.0},
        3: {BAL: 0.85, "val-loss": 0.4, "val-num-examples": 40.0},
    }
    # a round without validation (a site policy refused it) describes no model
    assert attribute(2, train={"num-examples": 400.0, "train-loss": 0.3}, evaluate={}) == {}
    assert attribute(1, train={BAL: 0.5, "val-num-examples": 9.0}, evaluate={}) == {
        0: {BAL: 0.5, "val-num-examples": 9.0}
    }


@pytest.mark.parametrize(
    ("run", "metric"),
    [
        ({}, "val-balanced-accuracy"),
        ({"task": "tabular", "model": "heart-mlp", "num-classes": 2}, "val-balanced-accuracy"),
        ({"task": "segmentation", "model": "unet"}, "val-dice"),
        ({"model-selection-metric": "val-loss"}, "val-loss"),
    ],
)
def test_auto_resolves_by_task(run, metric):
    assert resolve_metric(RunConfig.from_run_config(run)) == metric


# ------------------------------------------------------- RecordingStrategy
class Scripted(Strategy):
    """Inner strategy stand-in: each round's global model and aggregated metrics, scripted."""

    def __init__(self, models, train, evaluate):
        self.models, self.train, self.evaluate = models, train, evaluate

    def summary(self):
        pass

    def configure_train(self, server_round, arrays, config, grid):
        return []

    def aggregate_train(self, server_round, replies):
        return self.models[server_round], MetricRecord(self.train.get(server_round, {}))

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        metrics = self.evaluate.get(server_round)
        return None if metrics is None else MetricRecord(metrics)


class NoSites:
    """Transport stand-in: the scripted strategy sends nothing."""

    def send_and_receive(self, messages, *, timeout=None):
        return []


def _models(n: int) -> list[ArrayRecord]:
    out = []
    for r in range(n + 1):
        torch.manual_seed(r)
        out.append(state_to_record(get_model("cnn", width=8)))
    return out


META = {
    "model": "cnn",
    "model_kwargs": {"num_classes": 2, "width": 8},
    "task": "classification",
    "run_config": {},
}


def _run(tmp_path: Path, models, train, evaluate, metric: str | None = BAL) -> RecordingStrategy:
    strategy = RecordingStrategy(
        Scripted(models, train, evaluate),
        run_dir=tmp_path,
        checkpoint_meta=META,
        selection_metric=metric,
    )
    strategy.start(
        grid=NoSites(),
        initial_arrays=models[0],
        num_rounds=len(models) - 1,
        evaluate_fn=strategy.make_evaluate_fn(None),
    )
    return strategy


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]


def _same_weights(ckpt_state: dict, arrays: ArrayRecord) -> bool:
    expected = arrays.to_torch_state_dict()
    return all(torch.equal(ckpt_state[k], expected[k]) for k in expected)


def _val(value: float, n: int = 20, key: str = BAL) -> dict[str, float]:
    return {"num-examples": 100.0, "train-loss": 0.5, key: value, "val-num-examples": float(n)}


def test_evaluate_in_train_validation_picks_the_previous_rounds_model(tmp_path):
    # Prepare: 4 rounds; the val metrics of round r's train replies score round r-1's model,
    # the final evaluate exchange scores round 4's. Round 2's model is the best (0.90):
    # attributing the metrics to the round that carried them would pick round 3.
    models = _models(4)
    train = {1: _val(0.55), 2: _val(0.70), 3: _val(0.90), 4: _val(0.80)}
    evaluate = {4: {"num-examples": 20.0, BAL: 0.85}}
    # Execute
    strategy = _run(tmp_path, models, train, evaluate)
    # Assert: best_model.pt is round 2's model, with its aggregated val metrics
    ckpt = load_checkpoint(tmp_path / BEST_MODEL)
    assert (ckpt.round, ckpt.selected_round, ckpt.selection_metric) == (2, 2, BAL)
    assert ckpt.metrics == {BAL: 0.90, "val-num-examples": 20.0}
    assert _same_weights(ckpt.state_dict, models[2])
    assert strategy.best is not None and strategy.best.round == 2
    # the round log says which round's model each line's val metrics describe
    selection = [line["model-selection"] for line in _lines(tmp_path)]
    assert [s["validated"] for s in selection] == [
        {}, {"0": 0.55}, {"1": 0.70}, {"2": 0.90}, {"3": 0.80, "4": 0.85},
    ]  # fmt: skip
    assert [s["best-round"] for s in selection] == [None, 0, 1, 2, 2]
    assert selection[-1] == {
        "metric": BAL, "goal": "max", "validated": {"3": 0.80, "4": 0.85},
        "best-round": 2, "best-value": 0.90,
    }  # fmt: skip
    # and final_model.pt is untouched by all this: every round still has its checkpoint
    assert len(list((tmp_path / "checkpoints").glob("round-*.pt"))) == 4


def test_without_evaluate_in_train_each_round_scores_its_own_model(tmp_path):
    # Prepare: an evaluate exchange every round, no validation in train replies
    models = _models(3)
    train = {r: {"num-examples": 100.0, "train-loss": 0.5} for r in (1, 2, 3)}
    evaluate = {r: {"num-examples": 20.0, BAL: v} for r, v in ((1, 0.6), (2, 0.9), (3, 0.7))}
    # Execute
    _run(tmp_path, models, train, evaluate)
    # Assert
    ckpt = load_checkpoint(tmp_path / BEST_MODEL)
    assert ckpt.selected_round == 2 and _same_weights(ckpt.state_dict, models[2])
    assert [line["model-selection"]["validated"] for line in _lines(tmp_path)[1:]] == [
        {"1": 0.6}, {"2": 0.9}, {"3": 0.7},
    ]  # fmt: skip


def test_loss_selection_keeps_the_lowest_validation_loss(tmp_path):
    models = _models(3)
    train = {r: _val(v, key="val-loss") for r, v in ((1, 0.9), (2, 0.4), (3, 0.6))}
    evaluate = {3: {"num-examples": 20.0, "val-loss": 0.5}}
    _run(tmp_path, models, train, evaluate, metric="val-loss")
    ckpt = load_checkpoint(tmp_path / BEST_MODEL)
    assert ckpt.selected_round == 1 and ckpt.metrics["val-loss"] == 0.4
    assert _lines(tmp_path)[-1]["model-selection"]["goal"] == "min"


def test_rounds_without_validation_are_skipped_and_round_zero_is_the_last_resort(tmp_path):
    # Prepare: the sites validated only the initial model (round 1's train replies); later
    # their policy refused evaluation, and the final evaluate exchange was refused too
    models = _models(3)
    train = {1: _val(0.6), 2: {"num-examples": 100.0}, 3: {"num-examples": 100.0}}
    # Execute
    strategy = _run(tmp_path, models, train, {})
    # Assert: nothing better was ever validated, so the initial model is the best
    ckpt = load_checkpoint(tmp_path / BEST_MODEL)
    assert ckpt.selected_round == 0 and _same_weights(ckpt.state_dict, models[0])
    assert [line["model-selection"]["validated"] for line in _lines(tmp_path)[2:]] == [{}, {}]
    assert strategy.best is not None and strategy.best.round == 0


def test_no_validation_at_all_writes_no_best_model(tmp_path):
    models = _models(2)
    strategy = _run(tmp_path, models, {1: {"num-examples": 10.0}}, {})
    assert not (tmp_path / BEST_MODEL).exists()
    assert strategy.best is None
    assert _lines(tmp_path)[-1]["model-selection"]["best-round"] is None


def test_without_a_selection_metric_nothing_changes(tmp_path):
    _run(tmp_path, _models(1), {1: _val(0.7)}, {}, metric=None)
    assert not (tmp_path / BEST_MODEL).exists()
    assert all("model-selection" not in line for line in _lines(tmp_path))
