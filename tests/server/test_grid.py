"""PromptGrid: Flower's push-then-pull contract with a short poll, and the timeout."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.grid import PromptGrid
from tests.server.messages import StubGrid


class DelayedReplyGrid(StubGrid):
    """Transport whose reply to node ``n`` becomes pullable ``delays[n]`` seconds after push."""

    def __init__(self, delays: dict[int, float]) -> None:
        self.delays = delays
        self.node_ids = list(delays)
        self.ready_at: dict[str, tuple[float, Message]] = {}
        self.pulls = 0

    def get_nodes(self):
        return list(self.delays)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            reply = Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=msg)
            self.ready_at[msg.metadata.message_id] = (
                time.monotonic() + self.delays[msg.metadata.dst_node_id],
                reply,
            )
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic()
        out = []
        for mid in list(message_ids):
            t, reply = self.ready_at[mid]
            if t <= now:
                out.append(reply)
                del self.ready_at[mid]
        return out

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - not used
        raise NotImplementedError


def _messages(grid: Grid) -> list[Message]:
    return [
        grid.create_message(RecordDict(), MessageType.TRAIN, node, "1")
        for node in grid.get_node_ids()
    ]


def test_collects_every_reply_as_soon_as_it_is_there():
    inner = DelayedReplyGrid({1: 0.0, 2: 0.15, 3: 0.3})
    grid = PromptGrid(inner, poll=0.02)
    msgs = _messages(grid)
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(msgs, timeout=10))
    waited = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        m.metadata.message_id for m in msgs
    )
    # The last reply is ready after 0.3 s; a 3 s poll (Flower's) would take >= 3 s.
    assert waited < 1.5
    assert inner.pulls >= 2


def test_timeout_returns_the_replies_received_so_far():
    inner = DelayedReplyGrid({1: 0.0, 2: 60.0})
    grid = PromptGrid(inner, poll=0.02)
    msgs = _messages(grid)
    replies = list(grid.send_and_receive(msgs, timeout=0.2))
    assert [r.metadata.reply_to_message_id for r in replies] == [msgs[0].metadata.message_id]


def test_other_calls_go_to_the_wrapped_grid_and_poll_must_be_positive():
    inner = DelayedReplyGrid({7: 0.0})
    assert list(PromptGrid(inner).get_node_ids()) == [7]
    assert list(PromptGrid(inner).send_and_receive([], timeout=1)) == []
    with pytest.raises(ValueError, match="poll"):
        PromptGrid(inner, poll=0)
