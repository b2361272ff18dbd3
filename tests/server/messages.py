"""Building Flower messages for in-process test transports (no SuperLink)."""

from __future__ import annotations

import time
import uuid

from flwr.app import Message, Metadata, RecordDict


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
