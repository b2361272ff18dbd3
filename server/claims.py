"""Bound the aggregation weight each site may claim (issue 14, item 5).

FedAvg weights every update by the site's own ``num-examples`` (McMahan et al., AISTATS
2017, Algorithm 1), so one site that claims 10^12 examples sets the global model alone.
The coordinator cannot see a site's data, but it can fix, before the weight matters, how
much a site may claim:

* the run's cap ``max-site-examples`` (the largest training set the coordinator agreed
  to with any hospital): a claim above it is refused;
* the site's **registered count**: its first accepted claim in this run. Training data
  does not grow during a run, so a later claim above the registered count is refused.

A refused reply is left out of the round (and of SecAgg+'s sum, where the claim is read
at advertise-keys, before any mask is built) and recorded with the reason; the round
goes on with the others (``min-replies``). The registry is one object shared by the
secure-aggregation grid and the round log, so both paths apply the same rule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class ClaimRegistry:
    """Each site's registered training count and the run's cap.

    Parameters
    ----------
    max_examples : int
        ``max-site-examples``: the largest claim any site may register (> 0).

    Attributes
    ----------
    registered : dict[int, float]
        ``{node id: registered count}``.
    refused : list[dict]
        ``{"node", "round", "claimed", "allowed"}`` of every refused claim, in order.
    """

    max_examples: int
    registered: dict[int, float] = field(default_factory=dict)
    refused: list[dict[str, float | int]] = field(default_factory=list)

    def check(self, node: int, claimed: object, *, server_round: int) -> str | None:
        """Register or check a site's claim; return why it is refused, or None.

        Parameters
        ----------
        node : int
            The site's node id.
        claimed : object
            The reply's ``num-examples``.
        server_round : int
            For the record of a refusal.

        Returns
        -------
        str or None
            None when accepted (the first accepted claim is registered), else a reason
            naming the claim and the bound.
        """
        if (
            isinstance(claimed, bool)
            or not isinstance(claimed, int | float)
            or not math.isfinite(claimed)
            or claimed <= 0
        ):
            return self._refuse(node, server_round, math.nan, 0.0, "is not a positive count")
        value = float(claimed)
        allowed = self.registered.get(node, float(self.max_examples))
        if value > allowed:
            what = (
                f"exceeds its registered count {allowed:.0f}"
                if node in self.registered
                else f"exceeds max-site-examples = {self.max_examples}"
            )
            return self._refuse(node, server_round, value, allowed, what)
        self.registered.setdefault(node, value)
        return None

    def _refuse(
        self, node: int, server_round: int, claimed: float, allowed: float, what: str
    ) -> str:
        self.refused.append(
            {"node": node, "round": server_round, "claimed": claimed, "allowed": allowed}
        )
        reason = f"num-examples claim {claimed:.0f} {what}: update left out"
        log.warning("round %d: site %d: %s", server_round, node, reason)
        return reason
