"""One bounded wait for "at least N nodes": the coordinator's and the launchers' loop.

Flower's samplers wait for nodes forever; medfed bounds every such wait and lets the
caller say what a shortfall means (a clear error, or carrying on with fewer). Used by
``server.app.wait_for_sites`` (before the first round), ``server.quorum`` (before each
sampling) and the local deployment launcher (SuperNodes online).

Standard library only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def wait_for_nodes(
    count_nodes: Callable[[], int],
    *,
    at_least: int,
    timeout: float,
    poll: float = 1.0,
    what: str | None = None,
) -> int:
    """Poll ``count_nodes()`` until it reaches ``at_least`` or ``timeout`` seconds pass.

    Parameters
    ----------
    count_nodes : callable
        Returns how many nodes are connected now (e.g. ``len(list(grid.get_node_ids()))``).
    at_least : int
        How many nodes to wait for.
    timeout : float
        Seconds to wait at the most; ``count_nodes`` is called at least once.
    poll : float
        Seconds between two calls.
    what : str or None
        If given, each unsuccessful poll is logged at INFO as "waiting for <what>".

    Returns
    -------
    int
        The last count: ``>= at_least`` on success, less if the time ran out (the caller
        decides whether that is an error).

    """
    deadline = time.monotonic() + timeout
    while (n := count_nodes()) < at_least and time.monotonic() < deadline:
        if what is not None:
            log.info("waiting for %s: %d of %d connected", what, n, at_least)
        time.sleep(poll)
    return n
