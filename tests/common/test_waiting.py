"""The one bounded wait for N nodes."""

from __future__ import annotations

from common.waiting import wait_for_nodes


def test_returns_as_soon_as_enough_nodes_are_connected():
    # Prepare: 1, then 2, then 3 nodes
    counts = iter([1, 2, 3, 3])
    # Execute
    n = wait_for_nodes(lambda: next(counts), at_least=3, timeout=10.0, poll=0.0)
    # Assert
    assert n == 3
    assert next(counts) == 3  # not polled again once reached


def test_returns_the_last_count_when_the_time_runs_out():
    calls = []

    def count() -> int:
        calls.append(1)
        return 1

    assert wait_for_nodes(count, at_least=2, timeout=0.0, poll=0.0) == 1
    assert len(calls) == 1  # asked once even with no time to wait
