"""Secure sums at the coordinator: taking them out of replies, and the census before round 1.

:mod:`common.secure_sum` defines the small count arrays (validation score histograms,
training label counts) that sites send for the coordinator to learn only as a sum. This
module is the coordinator's side:

* :func:`take_secure_sums` removes the record from every reply and adds them up (under
  SecAgg+ the grid has already put the unmasked sum on one reply, server/secagg.py);
* :func:`run_census` sends the census before round 1 (``class-weighting =
  "federation"``): one ``train`` message per connected site with ``medfed-census = true``
  and the initial model, which the site answers without training; through SecAgg+ when
  it is on, so only the federation's label counts are learned (Bonawitz et al., CCS
  2017: the server learns the sum of the inputs and nothing else).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from common import secure_sum
from common.errors import DataError, FederationError

log = logging.getLogger(__name__)


def take_secure_sums(replies: list[Message]) -> dict[str, NDArray[np.float64]]:
    """Remove the :mod:`common.secure_sum` record from every reply; return their sum.

    Without SecAgg+ each site's reply carries its own counts; under SecAgg+ the grid
    attaches the already summed counts to one reply (server/secagg.py). Flower's
    strategies expect one ``ArrayRecord`` per reply, so the record is taken out before
    they see it. A record that is not an ``ArrayRecord`` of finite counts >= 0 is dropped
    with a warning (the reply's model update is unaffected).

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{array name: float64 summed counts}``; empty if no reply carried the record.
    """
    total: dict[str, NDArray[np.float64]] = {}
    for r in replies:
        if r.has_error() or secure_sum.RECORD not in r.content:
            continue
        record = r.content.pop(secure_sum.RECORD)
        node = r.metadata.src_node_id
        if not isinstance(record, ArrayRecord):
            log.warning("site %d: ignoring a malformed secure-sum record", node)
            continue
        try:
            arrays = {k: np.asarray(v.numpy(), dtype=np.float64) for k, v in record.items()}
            secure_sum.check_counts(arrays, {k: a.shape for k, a in arrays.items()})
        except (DataError, ValueError, TypeError) as exc:
            log.warning("site %d: ignoring a secure-sum record: %s", node, exc)
            continue
        for k, a in arrays.items():
            if k in total and total[k].shape != a.shape:
                log.warning("site %d: secure-sum array %r has another shape", node, k)
                continue
            total[k] = total[k] + a if k in total else a
    return total


def run_census(
    grid: Grid, *, initial_arrays: ArrayRecord, min_replies: int, timeout: float
) -> NDArray[np.float64]:
    """Learn the federation's training label counts, summed over the sites, before round 1.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The run's grid (a :class:`server.secagg.SecAggGrid` when SecAgg+ is on).
    initial_arrays : ArrayRecord
        The initial global model (the sites load it and send it back unchanged).
    min_replies : int
        Sites whose counts must be in the sum (run config ``min-replies``).
    timeout : float
        Seconds to wait for the replies (run config ``round-timeout``).

    Returns
    -------
    numpy.ndarray
        float64 ``(K,)`` summed class counts.

    Raises
    ------
    FederationError
        If fewer than ``min_replies`` sites answered, or no sum came back.
    """
    config = ConfigRecord({"server-round": 0, secure_sum.CENSUS_KEY: True})
    content = RecordDict({"arrays": initial_arrays, "config": config})
    messages = [
        grid.create_message(content, MessageType.TRAIN, node, "0")
        for node in sorted(grid.get_node_ids())
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    answered = [r for r in replies if not r.has_error()]
    for r in replies:
        if r.has_error():
            log.warning("census: site %d failed: %s", r.metadata.src_node_id, r.error.reason)
    sums = take_secure_sums(answered)
    counts = sums.get(secure_sum.CLASS_COUNTS)
    if len(answered) < min_replies or counts is None:
        raise FederationError(
            f"the census of class counts before round 1 got {len(answered)} of the "
            f"{min_replies} replies it needs (run config 'min-replies'); check the sites' "
            "logs, or use class-weighting = 'site'."
        )
    log.info(
        "census: federation class counts %s from %d sites",
        counts.astype(int).tolist(),
        len(answered),
    )
    return counts
