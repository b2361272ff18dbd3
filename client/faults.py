"""Fault injection for simulation: site dropout, a slow site, a site that crashes.

Flower client mods (``(Message, Context, ClientAppCallable) -> Message``, Flower 1.41
``flwr/clientapp/typing.py``) that only the simulation mounts in the site service
(client/site/simulated.py ``FAULT_MODS``; a site worker never has them in its chain).
They act only on ``train`` messages and only when the node config has a
``partition-id``, which only Flower's simulation engine sets, and no ``dataset-dir``: a
production site can not be made to fail by a run config. They read the message's run
config from its job (client/site/job.py), parsed once per message. Run-config keys (``faults.*``,
common/config.py):

``faults.dropout`` = p
    each round, each site independently drops out with probability ``p`` (decided by a
    generator seeded with ``(seed, round, partition-id)``, so a run is reproducible): the
    site does not train and answers ``ErrorCode.NODE_UNAVAILABLE`` with reason
    ``"injected fault: dropout"``; the round log lists it under ``dropped``.
``faults.slow-site`` = i, ``faults.slow-seconds`` = s, ``faults.slow-round`` = r
    from round ``r`` on (default 1), site ``i`` sleeps ``s`` seconds before training
    every round (a slow hospital; past ``round-timeout`` it is late and left out); the
    delay shows in the round's wall time and in the ``fault-delay-seconds`` train metric
    (every site of a run with faults reports it, 0 when not delayed).
``faults.crash-site`` = i, ``faults.crash-round`` = r
    from round ``r`` on, site ``i`` trains and then crashes before replying: the handler
    raises :class:`InjectedFault`, Flower answers the server with an error whose reason
    contains ``"injected fault: crash"``, and the round log lists it under ``failed``.

``faults.drop-site`` = i, ``faults.drop-stage`` = stage
    secure aggregation only: every round, site ``i`` stops answering at SecAgg+ stage
    ``stage`` (``advertise-keys``, ``share-keys``, ``masked-input`` or ``unmask``): it
    forgets the round's secrets and answers ``ErrorCode.NODE_UNAVAILABLE`` with reason
    ``"injected fault: dropout"``, as the SuperLink does for a node it lost. At
    ``unmask`` the site has already sent its masked input, so its update stays in the
    sum (its self-mask is rebuilt from the other sites' shares; Bonawitz et al., CCS
    2017, section 4); at an earlier stage it leaves the round. ``secagg.jsonl``
    (server/secagg.py) names the stage. This is :func:`stage_fault_injection`, a mod
    *outside* ``client/secagg_mod.py`` (the later stages never reach the train
    handler); the other faults are :func:`fault_injection`, inside it, around training.

A round still aggregates while ``min-replies`` sites reply (server/quorum.py), and a
secure round while enough sites survive each stage (server/secagg.py).
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from client.site.job import job_of
from common.config import RunConfig
from common.errors import ConfigError, MedfedError
from common.secagg.params import RECORD as SECAGG_RECORD

log = logging.getLogger(__name__)

REASON_DROPOUT = "injected fault: dropout"
REASON_CRASH = "injected fault: crash"
DELAY_METRIC = "fault-delay-seconds"


class InjectedFault(MedfedError, RuntimeError):  # noqa: N818 - it is not an error of medfed's
    """A crash injected by ``faults.crash-site`` (simulation only)."""


def drops_out(*, probability: float, seed: int, server_round: int, partition_id: int) -> bool:
    """Whether a site drops out of a round: one seeded Bernoulli(``probability``) draw.

    Parameters
    ----------
    probability : float
        In ``[0, 1)``.
    seed, server_round, partition_id : int
        Seed the generator, so the same run drops the same sites.

    Returns
    -------
    bool

    """
    if probability <= 0.0:
        return False
    rng = np.random.default_rng([seed, server_round, partition_id])
    return bool(rng.random() < probability)


def _virtual_site(context: Context) -> tuple[int, RunConfig] | None:
    """Return a virtual site's partition id and run config; None for a real site."""
    pid = context.node_config.get("partition-id")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return None
    job = job_of(context)
    if job.node.dataset_dir is not None:
        return None  # a real site's data: never inject
    return pid, job.run


def stage_fault_injection(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod, outside ``secagg_mod``: ``faults.drop-site`` stops at its stage.

    Acts only on ``train`` messages of a SecAgg+ stage at a virtual site of a simulation
    (see the module docstring); everything else goes to ``call_next`` unchanged.

    Returns
    -------
    flwr.app.Message
        ``call_next``'s reply, or, for ``faults.drop-site`` at ``faults.drop-stage``, an
        ``ErrorCode.NODE_UNAVAILABLE`` reply with reason :data:`REASON_DROPOUT` (the
        site's round state is wiped first: a site that went away keeps nothing).

    """
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return call_next(msg, context)
    record = msg.content.config_records.get(SECAGG_RECORD)
    if record is None:
        return call_next(msg, context)
    try:
        site = _virtual_site(context)
    except ConfigError:
        return call_next(msg, context)  # the site service refuses a bad config itself
    if site is None:
        return call_next(msg, context)
    pid, run = site
    if pid != run.faults.drop_site or record.get("stage") != run.faults.drop_stage:
        return call_next(msg, context)
    from client.secagg_mod import SiteSecAggState  # the mod this one wraps

    SiteSecAggState().save(context, drop_delta=True)
    log.warning(
        "round %s: %s at secagg stage %s (site %d)",
        record.get("round"),
        REASON_DROPOUT,
        run.faults.drop_stage,
        pid,
    )
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=REASON_DROPOUT), reply_to=msg)


def fault_injection(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: inject the run config's ``faults.*`` (simulation only).

    Returns
    -------
    flwr.app.Message
        The handler's reply, an error reply for a dropout, or (crash) nothing: it raises.

    Raises
    ------
    InjectedFault
        When this site is the crash site and the round is >= ``faults.crash-round``.

    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    site = _virtual_site(context)
    if site is None:
        return call_next(msg, context)
    pid, run = site
    server_round = int(str(msg.content.config_records["config"].get("server-round", 0)))
    if drops_out(
        probability=run.faults.dropout, seed=run.seed, server_round=server_round, partition_id=pid
    ):
        log.warning("round %d: %s (site %d)", server_round, REASON_DROPOUT, pid)
        return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=REASON_DROPOUT), reply_to=msg)
    slow = pid == run.faults.slow_site and server_round >= run.faults.slow_round
    delay = run.faults.slow_seconds if slow else 0.0
    if delay > 0:
        log.warning("round %d: injected fault: slow site %d (+%.1f s)", server_round, pid, delay)
        time.sleep(delay)
    reply = call_next(msg, context)
    if pid == run.faults.crash_site and server_round >= run.faults.crash_round:
        log.error("round %d: %s (site %d)", server_round, REASON_CRASH, pid)
        raise InjectedFault(f"{REASON_CRASH} (site {pid}, round {server_round}, mid-round)")
    faults_on = run.faults.dropout > 0 or run.faults.slow_site >= 0 or run.faults.crash_site >= 0
    if faults_on and not reply.has_error():
        # Every site of a faulty run reports the metric (0 when not delayed): Flower's
        # FedAvg refuses to aggregate replies whose MetricRecords have different keys.
        for record in reply.content.metric_records.values():
            record[DELAY_METRIC] = float(delay)
            break
    return reply
