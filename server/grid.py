"""Grid wrappers: a delegating base and a grid that collects replies promptly.

Flower 1.41's deployment ``Grid.send_and_receive`` (``flwr.superlink.grid.http_grid``)
checks for replies every 3 s. A medfed training round calls it at least twice (train,
evaluate) and SecAgg+ four more times, so the ServerApp alone added an expected
1.5 s per call to every round. :class:`PromptGrid` does the same push-then-pull
exchange with Flower's public ``push_messages`` / ``pull_messages`` and a short poll.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

#: Seconds between reply checks; each check is one cheap call to the SuperLink.
REPLY_POLL_SECONDS = 0.1


class DelegatingGrid(Grid):
    """A ``Grid`` that forwards every call to a wrapped grid; subclasses override some.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The wrapped grid (deployment, simulation, or another wrapper).

    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:
        """Delegate."""
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        """Delegate."""
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegate."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate."""
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """Delegate (Flower's ``NodeInfo`` of every connected node)."""
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Delegate."""
        return self._grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(DelegatingGrid):
    """``send_and_receive`` that checks for replies every ``poll`` seconds.

    Same contract as Flower's ``Grid.send_and_receive``: push all messages, then pull
    until every message has a reply or ``timeout`` seconds have passed (``None``: wait
    for all), and return the replies received.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The wrapped grid.
    poll : float
        Seconds between pulls, > 0 (default :data:`REPLY_POLL_SECONDS`).

    Raises
    ------
    ValueError
        If ``poll`` is not positive.

    """

    def __init__(self, grid: Grid, *, poll: float = REPLY_POLL_SECONDS) -> None:
        super().__init__(grid)
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll}")
        self.poll = poll

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and return their replies as they arrive (see class doc)."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll)
        return replies
