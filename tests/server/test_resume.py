"""Resume (server/resume.py): a kill between any two writes leaves a resumable run.

The real ServerApp (``server.app.main``) runs against :class:`FakeSites`, a transport whose
sites "train" by a fixed rule of the round and the received model (no data, no torch
training), so a whole run takes a fraction of a second and is exactly repeatable. A
crash is a :class:`Killed` raised at the n-th write of the run (every ``os.replace``,
the commit of every atomic write and checkpoint, and every append to the round log, where
half a line is written first), for every n.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from common.checkpoint import load_checkpoint
from common.errors import ConfigError
from server.app import main
from server.resume import (
    RESUME_FILE,
    RoundOffset,
    load_state,
    resumed_config,
    run_lock,
)
from server.scaffold import DELTA_RECORD, SERVER_RECORD
from tests.server.messages import InMemoryGrid

NODES = (100, 101)
ROUNDS = 3
#: Each round's validation score of the received model: best at round 1's model, so the
#: best model changes and is then kept (round r's train replies validate round r - 1).
SCORES = (0.55, 0.9, 0.6, 0.7, 0.65)


class Killed(BaseException):
    """The coordinator dies here (nothing in medfed catches a BaseException)."""


class FakeSites(InMemoryGrid):
    """Two sites that answer at once with a deterministic "trained" model.

    Replies come back in node order, so the aggregation sums in a fixed order.
    """

    def __init__(self) -> None:
        super().__init__(NODES)

    def answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        rnd = int(msg.content.config_records["config"]["server-round"])
        site = NODES.index(node) + 1
        val = {"val-balanced-accuracy": SCORES[rnd - 1] + 0.01 * site, "val-num-examples": 5}
        if msg.metadata.message_type.startswith("evaluate"):
            metrics = {"num-examples": 5, "val-balanced-accuracy": SCORES[rnd] + 0.01 * site}
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
        received = msg.content.array_records["arrays"]
        step = np.float32(0.01 * site * (1 + rnd % 2))
        arrays = {
            k: Array(a.numpy() + step if a.numpy().dtype.kind == "f" else a.numpy())
            for k, a in received.items()
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "metrics": MetricRecord({"num-examples": 10 * site, **val}),
            }
        )
        if SERVER_RECORD in msg.content.array_records:  # SCAFFOLD: a control-variate delta
            c = msg.content.array_records[SERVER_RECORD]
            content[DELTA_RECORD] = ArrayRecord(
                {k: Array(np.full_like(v.numpy(), 0.001 * site)) for k, v in c.items()}
            )
        return Message(content, reply_to=msg)


def _config(run_dir: Path, **changes: Any) -> dict[str, Any]:
    return {
        "num-server-rounds": ROUNDS, "min-sites": len(NODES), "dp.enabled": False,
        "secagg.enabled": False, "connect-timeout": 5.0, "run-dir": str(run_dir),
        "momentum": 0.0, "operating-point": "none", **changes,
    }  # fmt: skip


def _main(config: dict[str, Any], run_id: int = 1) -> None:
    ctx = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    main(FakeSites(), ctx)


def _resume(run_dir: Path, **changes: Any) -> None:
    _main(_config(run_dir, **{"resume-from": str(run_dir), **changes}), run_id=2)


@pytest.fixture
def kill_at(monkeypatch) -> Iterator[dict[str, int | None]]:
    """Count the run's writes; raise :class:`Killed` at write number ``plan["at"]``."""
    plan: dict[str, int | None] = {"at": None, "count": 0}
    real_replace, real_open = os.replace, pathlib.Path.open

    def tick() -> bool:
        n = plan["count"]
        plan["count"] = n + 1  # type: ignore[operator]
        return n == plan["at"]

    def replace(src, dst, *args, **kwargs):
        if tick():
            raise Killed(f"before replacing {dst}")
        return real_replace(src, dst, *args, **kwargs)

    def open_(self, mode="r", *args, **kwargs):
        fh = real_open(self, mode, *args, **kwargs)
        if "a" in mode and tick():
            fh.write('{"round": 99, "torn')  # half a line, then the kill
            fh.close()
            raise Killed(f"while appending to {self}")
        return fh

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(pathlib.Path, "open", open_)
    yield plan
    monkeypatch.undo()


def _outcome(run_dir: Path) -> dict[str, Any]:
    final = load_checkpoint(run_dir / "final_model.pt")
    best = load_checkpoint(run_dir / "best_model.pt")
    lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return {
        "final": final.state_dict,
        "best": (best.selected_round, best.metrics, best.state_dict),
        "rounds": [line["round"] for line in lines],
        "selection": [line["model-selection"] for line in lines],
        "train-sites": [line.get("train", {}).get("sites") for line in lines],
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
        "leftovers": sorted(p.name for p in run_dir.rglob(".*.tmp-*")),
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["rounds"] == b["rounds"] == list(range(ROUNDS + 1))
    assert a["selection"] == b["selection"]
    assert a["train-sites"] == b["train-sites"]
    assert a["checkpoints"] == b["checkpoints"]
    assert b["leftovers"] == []
    assert a["final"].keys() == b["final"].keys()
    assert all(torch.equal(a["final"][k], b["final"][k]) for k in a["final"])
    assert a["best"][:2] == b["best"][:2]
    assert all(torch.equal(a["best"][2][k], b["best"][2][k]) for k in a["best"][2])


def _kill_and_resume_at_every_write(tmp_path, kill_at, strategy: str, *, last: int | None) -> None:
    """Kill the run at each of its writes (the ``last`` ones only, if given) and resume it."""
    # Prepare: the uninterrupted run, counting its writes
    _main(_config(tmp_path / "whole", strategy=strategy))
    whole = _outcome(tmp_path / "whole")
    writes = kill_at["count"]
    assert writes >= 4 * ROUNDS  # checkpoint, best model, log line, resume state per round
    # the strategy's own state is in the resume state (FedAdam's moments, SCAFFOLD's c)
    kept = load_state(tmp_path / "whole").strategy  # type: ignore[union-attr]
    assert set(kept) == ({"m_t", "v_t"} if strategy == "fedadam" else {"c"})
    assert all(v is not None for v in kept.values())
    points = range(writes) if last is None else range(writes - last, writes)
    for n in points:
        run_dir = tmp_path / f"killed-{n}"
        kill_at.update(at=n, count=0)
        # Execute: the coordinator dies at write n, then the run is resumed
        with pytest.raises(Killed):
            _main(_config(run_dir, strategy=strategy))
        kill_at.update(at=None)
        if not (run_dir / "config.json").exists():  # died before the run existed
            with pytest.raises(ConfigError, match=r"holds no run|not a medfed run"):
                _resume(run_dir, strategy=strategy)
            continue
        _resume(run_dir, strategy=strategy)
        # Assert: the same run, every round logged once, nothing left over
        _same(whole, _outcome(run_dir))


def test_a_kill_at_any_write_of_the_last_round_leaves_a_resumable_run(
    tmp_path, server_identity, kill_at
):
    # the last round's checkpoint, best model, log line and resume state, and the final
    # model (the fast part; every write of every round: the slow test below)
    _kill_and_resume_at_every_write(tmp_path, kill_at, "fedadam", last=6)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedadam", "scaffold"])
def test_a_kill_between_any_two_writes_leaves_a_resumable_run(
    tmp_path, server_identity, kill_at, strategy
):
    _kill_and_resume_at_every_write(tmp_path, kill_at, strategy, last=None)


def test_a_run_killed_before_its_first_round_starts_over(tmp_path, server_identity, kill_at):
    _main(_config(tmp_path / "whole"))
    run_dir = tmp_path / "run"
    kill_at.update(at=1, count=0)  # the marker, then (config.json), then ... round 0's line
    with pytest.raises(Killed):
        _main(_config(run_dir))
    kill_at.update(at=None)
    assert load_state(run_dir) is None
    _resume(run_dir)
    _same(_outcome(tmp_path / "whole"), _outcome(run_dir))


# ------------------------------------------------------------------- clear errors
@pytest.fixture
def finished(tmp_path, server_identity) -> Path:
    run_dir = tmp_path / "finished"
    _main(_config(run_dir, strategy="fedadam"))
    return run_dir


def _resumable(finished: Path) -> Path:
    (finished / "final_model.pt").unlink()  # as if killed after the last round
    return finished


def test_resuming_a_finished_run_is_refused(finished):
    with pytest.raises(ConfigError, match=r"is finished .*nothing to resume"):
        _resume(finished, strategy="fedadam")


def test_resuming_what_is_not_a_run_is_refused(tmp_path, server_identity):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="cannot be resumed: it is not a medfed run"):
        _resume(home)
    with pytest.raises(ConfigError, match="cannot be resumed: it is not a directory"):
        _resume(tmp_path / "missing")
    assert sorted(p.name for p in home.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize(
    ("changes", "key"),
    [({"model": "gru"}, "'model'"), ({"strategy": "fedavg"}, "'strategy'"),
     ({"strategy-args.server-lr": 0.5}, "'strategy-args.server-lr'")],
)  # fmt: skip
def test_resuming_with_another_model_or_strategy_is_refused(finished, changes, key):
    run_dir = _resumable(finished)
    before = (run_dir / "rounds.jsonl").read_text()
    with pytest.raises(ConfigError, match=rf"same strategy, and these differ \({key}: run"):
        _resume(run_dir, **{"strategy": "fedadam", **changes})
    assert (run_dir / "rounds.jsonl").read_text() == before  # refused before any change


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b"not a zip",
        lambda b: b.replace(b"medfed-resume", b"medfed-resumX"),
    ],
    ids=["truncated", "garbage", "wrong-format"],
)
def test_a_corrupt_resume_state_is_refused_with_what_to_do(finished, damage):
    run_dir = _resumable(finished)
    state = run_dir / RESUME_FILE
    state.write_bytes(damage(state.read_bytes()))
    with pytest.raises(
        ConfigError, match=r"resume state .* is corrupt: .*backup, or start a new run"
    ):
        _resume(run_dir, strategy="fedadam")


def test_a_run_still_going_on_is_not_resumed_beside_it(finished):
    run_dir = _resumable(finished)
    with run_lock(run_dir), pytest.raises(ConfigError, match="still going on"):
        _resume(run_dir, strategy="fedadam")


def test_a_resumed_run_keeps_its_own_settings_and_takes_the_new_timeouts(tmp_path, caplog):
    from common.config import RunConfig

    saved = RunConfig.from_run_config(
        {"min-sites": 3, "min-replies": 2, "secagg.threshold": 0.6, "round-timeout": 60.0}
    )
    now = RunConfig.from_run_config(
        {
            "min-replies": 1,
            "round-timeout": 900.0,
            "eval-batch-size": 16,
            "sites-dir": "/data/sites",
        }
    )
    run = resumed_config(saved.to_run_config(), now, run_dir=tmp_path)
    assert (run.federation.min_sites, run.federation.min_replies, run.secagg.threshold) == (
        3,
        2,
        0.6,
    )
    assert (run.federation.round_timeout, run.paths.sites_dir) == (900.0, "/data/sites")
    assert run.evaluation.batch_size == 16  # memory only: the resuming machine's choice
    assert run.paths.run_dir == run.paths.resume_from == str(tmp_path)
    assert "keeps its own values of min-replies" in caplog.text


def test_round_offset_passes_the_runs_own_round_numbers(server_identity):
    seen: list[tuple[str, int]] = []

    class Spy(RoundOffset):
        pass

    class Inner:
        def summary(self):
            pass

        def configure_train(self, server_round, *args):
            seen.append(("train", server_round))
            return [Message(RecordDict(), dst_node_id=7, message_type="train")]

        def aggregate_train(self, server_round, replies):
            seen.append(("aggregate", server_round))
            return None, None

        def configure_evaluate(self, server_round, *args):
            seen.append(("evaluate", server_round))
            return []

        def aggregate_evaluate(self, server_round, replies):
            return None

    wrapped = Spy(Inner(), offset=4)  # type: ignore[arg-type]
    sent = wrapped.configure_train(1, ArrayRecord(), None, None)  # type: ignore[arg-type]
    wrapped.aggregate_train(2, [])
    wrapped.configure_evaluate(2, ArrayRecord(), None, None)  # type: ignore[arg-type]
    assert seen == [("train", 5), ("aggregate", 6), ("evaluate", 6)]
    # the round is the messages' group id (server/secagg.py numbers its rounds by it)
    assert [m.metadata.group_id for m in sent] == ["5"]
