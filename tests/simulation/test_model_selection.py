"""Federated model selection end to end: the real ServerApp and virtual sites in one process.

``InProcessFederation`` is a transport only: each message the ServerApp pushes goes to the
real ClientApp entry point (``client.app.dispatch``) of a virtual site (node config
``partition-id``), i.e. the site service with its policy, handlers and egress guard, on
tiny site datasets (tests/sites.py). No ``eval-dataset-dir``: the coordinator holds no
data, as in deployment, and still writes ``best_model.pt``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from typer.testing import CliRunner

from client.app import dispatch
from common import cli
from common.checkpoint import load_checkpoint
from server.app import main
from server.selection import BEST_MODEL
from tests.server.messages import InMemoryGrid
from tests.sites import tiny_site

BAL = "val-balanced-accuracy"
#: Virtual sites: (training images, validation images, signal), unequal validation sizes
#: and a learnable but differently clear signal (tests/sites.py).
SITES = ((24, 8, 0.5), (16, 20, 0.2))


class InProcessFederation(InMemoryGrid):
    """Deliver every pushed message to a virtual site's ClientApp; replies are pulled."""

    sorted_replies = False

    def __init__(self, run_config: dict) -> None:
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i},
                state=RecordDict(),
                run_config=run_config,
            )
            for i in range(len(SITES))
        }
        super().__init__(self.contexts)

    def answer(self, msg: Message) -> Message:
        return dispatch(msg, self.contexts[msg.metadata.dst_node_id])


def _federate(tmp_path: Path, **run) -> tuple[Path, list[dict]]:
    for i, (train, val, signal) in enumerate(SITES):
        tiny_site(tmp_path / "sites" / f"site-{i}", train=train, val=val, seed=i, signal=signal)
    config = {
        "num-server-rounds": 3, "min-sites": len(SITES), "batch-size": 8,
        "learning-rate": 0.02, "dp.enabled": False, "secagg.enabled": False,
        "connect-timeout": 5.0, "run-dir": str(tmp_path / "run"),
        "sites-dir": str(tmp_path / "sites"), **run,
    }  # fmt: skip
    grid = InProcessFederation(config)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    run_dir = tmp_path / "run"
    lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return run_dir, lines


def _weighted(sites: dict, count_key: str) -> float:
    """The validation-size-weighted mean of the sites' balanced accuracy, by hand."""
    total = sum(s[count_key] for s in sites.values())
    return sum(s[count_key] * s[BAL] for s in sites.values()) / total


@pytest.mark.parametrize("fold", [True, False], ids=["evaluate-in-train", "evaluate-phase"])
def test_best_model_is_the_best_validated_round_and_evaluates(
    tmp_path, server_identity, caplog, fold
):
    # Execute: 3 rounds over two virtual sites, no data at the coordinator
    caplog.set_level(logging.INFO, logger="server.app")
    run_dir, lines = _federate(tmp_path, **{"evaluate-in-train": fold})
    # Assert: every line says which round's model the sites' validation described, with
    # the validation-size-weighted mean of their replies (sizes 8 and 20)
    expected: dict[str, float] = {}
    for line in lines[1:]:
        r = line["round"]
        if fold:  # round r's train replies validated round r-1's model
            train_sites = line["train"]["sites"]
            assert {int(s["val-num-examples"]) for s in train_sites.values()} == {8, 20}
            expected[str(r - 1)] = _weighted(train_sites, "val-num-examples")
        if line["evaluate"]["sites"]:  # the evaluate exchange validated round r's model
            expected[str(r)] = _weighted(line["evaluate"]["sites"], "num-examples")
    validated = {k: v for line in lines for k, v in line["model-selection"]["validated"].items()}
    scored = {"0", "1", "2", "3"} if fold else {"1", "2", "3"}  # round 0: the initial model
    assert validated.keys() == expected.keys() == scored
    for key, value in expected.items():
        assert validated[key] == pytest.approx(value, abs=1e-9)
    # best_model.pt is the round the log names: the best trained round, the later on a tie
    best = lines[-1]["model-selection"]["best-round"]
    trained = {int(k): v for k, v in validated.items() if int(k) > 0}
    assert trained[best] == max(trained.values())
    assert best == max(k for k, v in trained.items() if v == trained[best])
    ckpt = load_checkpoint(run_dir / BEST_MODEL)
    assert (ckpt.selected_round, ckpt.round, ckpt.selection_metric) == (best, best, BAL)
    assert ckpt.metrics[BAL] == pytest.approx(validated[str(best)])
    assert ckpt.metrics["val-num-examples"] == 28
    same_round = load_checkpoint(run_dir / "checkpoints" / f"round-{best:03d}.pt")
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in same_round.state_dict.items())
    assert (run_dir / "final_model.pt").is_file()
    assert all(line["global"] == {} for line in lines)  # the coordinator evaluated nothing
    assert f"best model: round {best} ({BAL} " in caplog.text
    # and it loads and scores with `medfed evaluate`
    cli._register_plugins()
    result = CliRunner().invoke(
        cli.app,
        ["evaluate", "--checkpoint", str(run_dir / BEST_MODEL), "--data",
         str(tmp_path / "sites" / "site-1"), "--split", "val"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["round"] == best and scored["num-images"] == 20
