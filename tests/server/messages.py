"""Building Flower messages for in-process test transports (no SuperLink)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from flwr.app import Message, Metadata, RecordDict
from flwr.serverapp import Grid


def new_message(
    content: RecordDict,
    message_type: str,
    dst_node_id: int,
    group_id: str,
    ttl: float | None = None,
    run_id: int = 1,
) -> Message:
    """A server-to-node message with fresh metadata, as ``Grid.create_message`` makes it."""
    md = Metadata(
        run_id=run_id,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=ttl or 3600.0,
        message_type=message_type,
    )
    return Message(content, metadata=md)


class StubGrid(Grid):
    """The parts of a test ``Grid`` that do not move messages: nodes ``node_ids``, no run."""

    node_ids: list[int]

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return new_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return list(self.node_ids)


class InMemoryGrid(StubGrid):
    """A ``Grid`` without a SuperLink: each pushed message is answered at once.

    Subclasses implement :meth:`answer`; a pushed message gets a fresh id as a SuperLink
    would give it, and its reply waits to be pulled.
    """

    #: Pulled replies sorted by node id (a fixed aggregation order).
    sorted_replies = True

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)
        self.replies: dict[str, Message] = {}

    def answer(self, msg: Message) -> Message:
        """Return the node's reply to ``msg``."""
        raise NotImplementedError

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            md = msg.metadata
            sent = new_message(msg.content, md.message_type, md.dst_node_id, md.group_id, md.ttl)
            self.replies[sent.metadata.message_id] = self.answer(sent)
            ids.append(sent.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        got = [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
        return sorted(got, key=lambda m: m.metadata.src_node_id) if self.sorted_replies else got

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
