"""Bounded rounds: sampling among connected sites and the reply quorum (server/quorum.py)."""

from __future__ import annotations

import json
import uuid

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg

from common.errors import ConfigError, FederationError
from common.models import get_model
from common.records import state_to_record
from server.quorum import QuorumStrategy
from server.runlog import RecordingStrategy


class ConnectedGrid:
    """Transport stand-in: only reports which node ids are connected."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def _fedavg(min_sites: int) -> FedAvg:
    return FedAvg(min_train_nodes=min_sites, min_evaluate_nodes=min_sites,
                  min_available_nodes=min_sites)  # fmt: skip


def _quorum(min_replies=2, min_sites=3):
    return QuorumStrategy(
        _fedavg(min_sites), min_replies=min_replies, min_sites=min_sites, sample_timeout=0.0,
        poll=0.01,
    )  # fmt: skip


def _as_sent(msg: Message) -> Message:
    """Give a configured message the metadata the SuperLink would (so replies can refer)."""
    md = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=0,
        dst_node_id=msg.metadata.dst_node_id, reply_to_message_id="", group_id="1",
        created_at=0.0, ttl=3600.0, message_type=msg.metadata.message_type,
    )  # fmt: skip
    return Message(msg.content, metadata=md)


def _reply(msg: Message, *, n: int = 10, error: bool = False) -> Message:
    if error:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="x"), reply_to=msg)
    content = RecordDict(
        {
            "arrays": msg.content.array_records["arrays"],
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content, reply_to=msg)


@pytest.fixture
def arrays(monkeypatch) -> ArrayRecord:
    # Flower's strategies build messages with the ServerApp's task identity.
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1 if attr == "_run_id" else 0)
    return state_to_record(get_model("cnn"))


def test_sampling_does_not_wait_for_a_dead_site(arrays):
    # Prepare: 3 sites expected, 2 connected (Flower's own sample_nodes would block forever)
    strategy = _quorum()
    # Execute
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), ConnectedGrid([11, 12])))
    # Assert
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]


def test_round_aggregates_when_the_quorum_replied(arrays):
    strategy = _quorum(min_replies=2)
    sent = [_as_sent(m) for m in strategy.configure_train(1, arrays, ConfigRecord(),
                                                          ConnectedGrid([1, 2, 3]))]  # fmt: skip
    # Execute: two replies, one site silent (dropped at the deadline)
    new_arrays, metrics = strategy.aggregate_train(1, [_reply(sent[0]), _reply(sent[1], n=30)])
    # Assert
    assert new_arrays is not None
    assert metrics is not None


def test_round_below_quorum_fails_loudly_and_is_logged(tmp_path, arrays):
    # Prepare
    inner = _quorum(min_replies=2)
    strategy = RecordingStrategy(inner, run_dir=tmp_path, checkpoint_meta={})
    sent = [_as_sent(m) for m in strategy.configure_train(1, arrays, ConfigRecord(),
                                                          ConnectedGrid([1, 2, 3]))]  # fmt: skip
    # Execute / Assert: one good reply, one error reply, one silent site
    with pytest.raises(FederationError, match="quorum min-replies=2"):
        strategy.aggregate_train(1, [_reply(sent[0]), _reply(sent[1], error=True)])
    [line] = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert line["round"] == 1 and "quorum" in line["error"]
    assert len(line["train"]["replied"]) == 1
    assert len(line["train"]["failed"]) == 1
    assert len(line["train"]["dropped"]) == 1


def test_too_few_connected_sites_fail_before_sampling(tmp_path, arrays):
    strategy = RecordingStrategy(_quorum(min_replies=2), run_dir=tmp_path, checkpoint_meta={})
    with pytest.raises(FederationError, match="only 1 site"):
        list(strategy.configure_train(1, arrays, ConfigRecord(), ConnectedGrid([5])))
    assert "error" in json.loads((tmp_path / "rounds.jsonl").read_text())


def test_invalid_quorum_is_a_config_error():
    with pytest.raises(ConfigError, match="min_replies"):
        QuorumStrategy(_fedavg(3), min_replies=4, min_sites=3, sample_timeout=0.0)
    with pytest.raises(ConfigError, match="min_replies"):
        QuorumStrategy(_fedavg(3), min_replies=0, min_sites=3, sample_timeout=0.0)


def test_run_config_quorum_key_is_validated():
    from common.config import RunConfig

    assert RunConfig.from_run_config({"min-replies": 2}).federation.min_replies == 2
    with pytest.raises(ConfigError, match="min-replies"):
        RunConfig.from_run_config({"min-replies": 4, "min-sites": 3})


@pytest.mark.parametrize(
    ("dp", "reproducible", "label"),
    [
        (True, False, "site-secret"),
        (True, True, "reproducible (NOT PRIVATE)"),
        (False, True, "off"),
    ],
)
def test_every_round_line_says_how_dp_noise_was_drawn(tmp_path, dp, reproducible, label):
    from server.runlog import dp_noise_label

    strategy = RecordingStrategy(
        _quorum(min_replies=1),
        run_dir=tmp_path,
        checkpoint_meta={},
        dp_noise=dp_noise_label(dp_enabled=dp, reproducible=reproducible),
    )
    strategy.make_evaluate_fn(None)(0, ArrayRecord())
    line = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])
    assert line["dp-noise"] == label


def test_evaluate_exchange_only_in_the_listed_rounds(arrays):
    # Prepare: evaluate-in-train, 3 rounds: only the final model gets an evaluate message
    strategy = QuorumStrategy(
        _fedavg(3), min_replies=1, min_sites=3, sample_timeout=0.0,
        evaluate_rounds=frozenset({3}),
    )  # fmt: skip
    grid = ConnectedGrid([1, 2, 3])
    # Execute
    early = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), grid))
    final = list(strategy.configure_evaluate(3, arrays, ConfigRecord(), grid))
    # Assert
    assert early == []
    assert len(final) == 3
