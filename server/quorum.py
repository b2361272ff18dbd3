"""Bounded rounds: sample only connected sites, and aggregate only with a quorum of replies.

Flower's ``sample_nodes`` (flwr/serverapp/strategy/strategy_utils.py) waits *forever*
until ``min_available_nodes`` sites are connected, and FedAvg silently aggregates any
number of replies (or returns nothing when none arrive). In a real federation a hospital
can go down mid-run; :class:`QuorumStrategy` wraps the inner strategy (DESIGN section 9,
rule 7) so that

* before sampling, it waits at most ``sample_timeout`` seconds for ``min_sites`` sites,
  then lowers the inner strategy's ``min_available_nodes`` / ``min_train_nodes`` /
  ``min_evaluate_nodes`` to what is connected, so sampling never hangs on a dead node;
  fewer connected sites than the quorum fails the round at once;
* the round itself is bounded by ``round-timeout`` (``Strategy.start(timeout=...)``);
* after the deadline, training is aggregated over the sites that replied if at least
  ``min-replies`` did; otherwise :class:`~common.errors.FederationError` is raised
  (``server.runlog.RecordingStrategy`` records it in ``rounds.jsonl`` and the run fails).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.errors import ConfigError, FederationError
from common.waiting import wait_for_nodes

log = logging.getLogger(__name__)

#: Seconds each round waits for missing sites to (re)connect before sampling among those
#: connected: short, because ``wait_for_sites`` already waited ``connect-timeout`` before
#: round 1 and a site that is gone should cost the round little.
SAMPLE_WAIT_SECONDS = 10.0

_MIN_ATTRS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")


class QuorumStrategy(Strategy):
    """Wrap ``inner``: bounded sampling and a reply quorum per training round.

    Parameters
    ----------
    inner : Strategy
        The aggregation strategy (FedAvg...). Its ``min_*_nodes`` attributes, when
        present, are lowered to the connected count before each sampling.
    min_replies : int
        Quorum: training replies (without error) needed to aggregate a round, >= 1.
    min_sites : int
        Sites the federation expects; sampling waits up to ``sample_timeout`` for them.
    sample_timeout : float
        Seconds to wait for ``min_sites`` connected sites before sampling among those
        that are connected, >= 0.
    poll : float
        Seconds between connection checks, > 0.
    evaluate_rounds : frozenset[int] or None
        Rounds with an evaluate exchange; None for every round.

    Raises
    ------
    ConfigError
        For a quorum < 1, ``min_replies`` > ``min_sites``, or negative timeouts.

    """

    def __init__(
        self,
        inner: Strategy,
        *,
        min_replies: int,
        min_sites: int,
        sample_timeout: float,
        poll: float = 1.0,
        evaluate_rounds: frozenset[int] | None = None,
    ) -> None:
        if min_replies < 1:
            raise ConfigError(f"min_replies must be >= 1, got {min_replies}")
        if min_replies > min_sites:
            raise ConfigError(
                f"min_replies={min_replies} exceeds min_sites={min_sites}; lower min-replies"
            )
        if sample_timeout < 0 or poll <= 0:
            raise ConfigError("sample_timeout must be >= 0 and poll > 0")
        self.inner = inner
        self.min_replies = min_replies
        self.min_sites = min_sites
        self.sample_timeout = sample_timeout
        self.poll = poll
        self.evaluate_rounds = evaluate_rounds
        self._originals = {a: getattr(inner, a) for a in _MIN_ATTRS if hasattr(inner, a)}

    def summary(self) -> None:
        """Log the wrapped strategy's summary and the quorum."""
        log.info("quorum: %d of the sampled sites must reply per round", self.min_replies)
        self.inner.summary()

    # -------------------------------------------------------------------- sampling
    def connected_sites(self, grid: Grid) -> int:
        """Wait (bounded) for ``min_sites`` connected sites; return how many are connected.

        Raises
        ------
        FederationError
            If fewer than ``min_replies`` sites are connected after the wait.

        """
        n = wait_for_nodes(
            lambda: len(list(grid.get_node_ids())),
            at_least=self.min_sites,
            timeout=self.sample_timeout,
            poll=self.poll,
        )
        if n < self.min_replies:
            raise FederationError(
                f"only {n} site(s) connected, fewer than the quorum min-replies="
                f"{self.min_replies}; the round cannot reach a quorum."
            )
        if n < self.min_sites:
            log.warning("only %d of %d sites connected; sampling among them", n, self.min_sites)
        return n

    def _adapt(self, connected: int) -> None:
        for attr, original in self._originals.items():
            setattr(self.inner, attr, max(0, min(original, connected)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample among connected sites only (bounded wait), then delegate."""
        self._adapt(self.connected_sites(grid))
        return self.inner.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample among connected sites only (bounded wait), then delegate.

        Sends nothing in rounds outside ``evaluate_rounds`` (``evaluate-in-train``: the
        sites evaluated the global model inside the next train message already).
        """
        if self.evaluate_rounds is not None and server_round not in self.evaluate_rounds:
            return []
        self._adapt(self.connected_sites(grid))
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    # ----------------------------------------------------------------- aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate if at least ``min_replies`` sites replied without error.

        Raises
        ------
        FederationError
            When the quorum is not reached (the run fails loudly; nothing is skipped).

        """
        replies = list(replies)
        ok = sum(1 for r in replies if not r.has_error())
        if ok < self.min_replies:
            raise FederationError(
                f"round {server_round}: only {ok} site(s) replied with an update before the "
                f"deadline, fewer than the quorum min-replies={self.min_replies} "
                f"({len(replies) - ok} error repl(ies)); the round is not aggregated."
            )
        return self.inner.aggregate_train(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate; evaluation metrics are informative, so no quorum is enforced."""
        return self.inner.aggregate_evaluate(server_round, replies)
