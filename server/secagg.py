"""Coordinator side of secure aggregation: SecAgg+ on Flower's Message API.

Why a ``Grid`` wrapper
----------------------
SecAgg+ needs four message exchanges per training round (Bell et al., CCS 2020,
Algorithm 2: advertise keys, share keys, masked input, unmask), but Flower's
``Strategy.start`` performs one ``grid.send_and_receive`` per training round.
:class:`SecAggGrid` wraps the real grid: for ``train`` messages its
``send_and_receive`` runs the whole protocol with the real grid and returns, for each
surviving site, an ordinary-looking reply whose arrays are the *unmasked weighted mean*
(global model + mean delta) and whose metrics are the site's own train metrics. FedAvg's
weighted mean of identical arrays is that array, so FedAvg-family strategies,
:class:`~server.runlog.RecordingStrategy` and the per-site metric log keep working
unchanged. ``evaluate`` messages pass straight through, unless the run picks an operating
point: then they become a validate-only secure round (:meth:`SecAggGrid._validate`), so
the final model's score histogram too is learned only as a sum. The coordinator never
holds a single site's update: only masked vectors and, after unmasking, their sum.

Failure semantics
-----------------
Each stage waits at most the strategy's ``timeout`` (run config ``round-timeout``) for
its replies; the deadline applies per stage. A site leaves the round at the first stage
where it is *late* (no reply before the deadline), *dropped* (an
``ErrorCode.NODE_UNAVAILABLE`` reply: the SuperLink lost it, or a simulated site went
away), *failed* (any other error reply, e.g. a crash while training at advertise-keys)
or *excluded* (a malformed message, :class:`SecAggProtocolError`; never trusted).
``secagg.jsonl`` lists each under ``faults`` with the stage and whether its input is in
the sum. A site that sent its masked input and then does not answer ``unmask`` is still
a survivor: its update is in the sum and its self-mask is rebuilt from the other sites'
seed shares (Bonawitz et al., CCS 2017, section 4, round 4). A site that leaves before
sending its masked input is not in the sum, and its pairwise masks are removed with its
mask key rebuilt from the survivors' shares. Up to ``m - t`` holders of each
neighbourhood may be missing at unmask and the round completes with the sum of exactly
the sites that sent their masked input. With fewer, :class:`SecAggAbortedError`: logged at
ERROR, appended to ``secagg.jsonl``, and every site that answered gets an error reply
naming the reason, so ``rounds.jsonl`` records the round as failed and the global model
stays as it was (Flower's legacy workflow skips such a round silently).

What the strategy sees of a fault (and so ``rounds.jsonl``): a late site that never
answered gets no reply (``dropped`` there); a site that answered and then went late or
away gets an ``ErrorCode.NODE_UNAVAILABLE`` error reply (``dropped``); a site that failed
or was excluded gets an error reply with its own reason (``failed``); a site that went
away at ``unmask`` gets an ordinary reply (``replied``: its update is in the model).
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from numpy.typing import NDArray

from common import secure_sum
from common.config import SecAggConfig
from common.replies import ReplyCode
from common.secagg import crypto, schema
from common.secagg.encoding import Layout, apply_mean_delta, decode_mean, quantisation_step
from common.secagg.errors import SecAggAbortedError, SecAggProtocolError
from common.secagg.graph import neighbourhoods
from common.secagg.params import ADVERTISE, MASKED_INPUT, RECORD, SHARE_KEYS, UNMASK, WEIGHT_KEY
from common.wire import VAL_COUNT
from server.claims import ClaimRegistry
from server.grid import DelegatingGrid

log = logging.getLogger(__name__)

SECAGG_LOG = "secagg.jsonl"
#: Error code of the synthetic error replies of sites whose secure round failed (the
#: one SecAgg+ code of common.errors.CODES; a site that went away keeps Flower's
#: ``ErrorCode.NODE_UNAVAILABLE``).
ABORT_CODE = int(ReplyCode.SECAGG)
#: At most this many share subsets are tried when a rebuilt secret fails verification.
MAX_COMBINATIONS = 64

#: ``send(stage, {node: content}) -> {node: reply content, or its Error (or reason)}``;
#: nodes without a reply before the stage deadline are absent.
Transport = Callable[[str, dict[int, RecordDict]], dict[int, RecordDict | Error | str]]

#: Kinds of fault in :attr:`RoundReport.faults`: no reply before the stage deadline ...
FAULT_LATE = "late"
#: ... an ``ErrorCode.NODE_UNAVAILABLE`` reply (the site went away) ...
FAULT_DROPPED = "dropped"
#: ... any other error reply (e.g. a crash while training) ...
FAULT_FAILED = "failed"
#: ... or a malformed message (never trusted).
FAULT_EXCLUDED = "excluded"
FAULT_KINDS = (FAULT_LATE, FAULT_DROPPED, FAULT_FAILED, FAULT_EXCLUDED)
#: Reason recorded for a site without a reply before a stage's deadline.
NO_REPLY = "no reply before the deadline"
#: Purposes of a secure round (``purpose`` in ``secagg.jsonl``): a training round, the
#: census before round 1, or the validate-only round of the final model.
PURPOSE_TRAIN = "train"
PURPOSE_CENSUS = "census"
PURPOSE_VALIDATE = "validate"


@dataclass
class RoundReport:
    """What one secure-aggregation round did (one line of ``secagg.jsonl``).

    ``faults`` holds, per site, the first stage at which it left the round, the kind
    (:data:`FAULT_KINDS`) and the reason; the JSON line adds ``in-sum``: whether the
    site's update is in the unmasked sum anyway (a site gone at ``unmask``).
    ``step`` is the quantisation step and ``total_weight`` the weight of the sites in the
    sum (:func:`common.secagg.encoding.mean_error_bound` gives the error of the mean).
    """

    server_round: int
    status: str = "running"
    reason: str = ""
    sampled: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    dropped: dict[str, dict[int, str]] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    masked_length: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    faults: dict[int, dict[str, str]] = field(default_factory=dict)
    step: float = 0.0
    total_weight: float = 0.0
    #: What the round was for: :data:`PURPOSE_TRAIN`, :data:`PURPOSE_CENSUS` or
    #: :data:`PURPOSE_VALIDATE` (the final model's validation, no training).
    purpose: str = "train"

    def note_fault(self, node: int, *, stage: str, kind: str, reason: str) -> None:
        """Record that ``node`` left the round at ``stage`` (its first fault only)."""
        self.faults.setdefault(node, {"stage": stage, "kind": kind, "reason": reason})

    def as_json(self) -> dict[str, Any]:
        """JSON-safe dict."""
        up = sum(self.bytes_up.values())
        survivors = set(self.survivors)
        return {
            "round": self.server_round,
            "purpose": self.purpose,
            "status": self.status,
            "reason": self.reason,
            "sampled": sorted(self.sampled),
            "survivors": sorted(self.survivors),
            "dropped": {s: {str(k): v for k, v in d.items()} for s, d in self.dropped.items()},
            "excluded": {str(k): v for k, v in self.excluded.items()},
            "bytes-up": up,
            "bytes-down": sum(self.bytes_down.values()),
            "masked-length": self.masked_length,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "faults": [
                {"site": node, **fault, "in-sum": node in survivors}
                for node, fault in sorted(self.faults.items())
            ],
            "quantisation-step": self.step,
            "total-weight": self.total_weight,
        }


@dataclass(frozen=True)
class RoundResult:
    """The unmasked outcome of a round.

    Attributes
    ----------
    arrays : dict[str, numpy.ndarray]
        New global state: global + weighted mean delta (float arrays, original dtype);
        non-float arrays unchanged.
    mean_delta : numpy.ndarray, shape (L,), float64
        The decoded weighted mean delta.
    survivors : list[int]
        Sites whose masked input is in the sum.
    total_weight : float
        Sum of the survivors' ``num-examples``.
    metrics : dict[int, MetricRecord]
        Each survivor's train metrics.
    sums : dict[str, numpy.ndarray]
        The survivors' secure-sum arrays summed (:mod:`common.secure_sum`); empty when
        the run has none.

    """

    arrays: dict[str, NDArray[np.generic]]
    mean_delta: NDArray[np.float64]
    survivors: list[int]
    total_weight: float
    metrics: dict[int, MetricRecord]
    sums: dict[str, NDArray[np.float64]] = field(default_factory=dict)


def content_nbytes(content: RecordDict) -> int:
    """Approximate wire size of a content: array payloads plus bytes/str config values."""
    total = sum(len(a.data) for ar in content.array_records.values() for a in ar.values())
    for rec in content.config_records.values():
        for v in rec.values():
            items = v if isinstance(v, list) else [v]
            total += sum(len(x) if isinstance(x, bytes | str) else 8 for x in items)
    total += sum(8 * len(m) for m in content.metric_records.values())
    return total


#: ``{site: [(holder index, share)]}``: the shares of one kind revealed at unmask.
_Shares = dict[int, list[tuple[int, bytes]]]


@dataclass
class RoundState:
    """What the coordinator knows of one secure round, filled in stage by stage.

    The explicit state the per-stage methods of :class:`SecAggRound` pass along (as
    Flower's ``SecAggPlusWorkflow`` passes its ``WorkflowState``). It holds public keys,
    weights, routed ciphertexts and the masked sum: never a single site's update.

    Attributes
    ----------
    adverts, weights, metrics : dict
        Per site that advertised keys: its advertisement, its weight (``num-examples``)
        and its train metrics (advertise-keys).
    graph : dict[int, list[int]]
        Each site's neighbourhood, itself included (:func:`common.secagg.graph.neighbourhoods`).
    threshold : int
        Shares needed in the smallest neighbourhood.
    total_weight, step : float
        The advertised sites' total weight and the quantisation step it gives.
    shared : list[int]
        Sites whose encrypted shares went out (share-keys).
    outbox : dict[int, dict[int, bytes]]
        ``dst -> src -> ciphertext`` routed at masked-input.
    active : dict[int, set[int]]
        Per site that sent its masked input: the neighbours whose masks it added.
    survivors, gone : set[int]
        Sites whose input is in the sum; sites that shared keys but are not in the sum.
    total : numpy.ndarray
        ``(L,)`` ``uint32``: the masked sum, unmasked in place at unmask.

    """

    adverts: dict[int, schema.AdvertiseReply] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    metrics: dict[int, MetricRecord] = field(default_factory=dict)
    graph: dict[int, list[int]] = field(default_factory=dict)
    threshold: int = 0
    total_weight: float = 0.0
    step: float = 0.0
    shared: list[int] = field(default_factory=list)
    outbox: dict[int, dict[int, bytes]] = field(default_factory=dict)
    active: dict[int, set[int]] = field(default_factory=dict)
    survivors: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)
    total: NDArray[np.uint32] = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))


class SecAggRound:
    """Coordinator logic of one SecAgg+ round, independent of Flower's transport.

    Parameters
    ----------
    params : SecAggConfig
        From the run config.
    server_round : int
        Flower's round number (bound into every key derivation and ciphertext).
    global_arrays : ArrayRecord
        The global model sent to every site this round (the deltas' reference).
    transport : Transport
        Sends one stage's contents and returns the replies.
    claims : server.claims.ClaimRegistry, optional
        Bounds each site's ``num-examples`` (its weight in the sum); a site whose claim
        it refuses is excluded at advertise-keys, before any mask depends on the weight.
    """

    def __init__(
        self,
        *,
        params: SecAggConfig,
        server_round: int,
        global_arrays: ArrayRecord,
        transport: Transport,
        claims: ClaimRegistry | None = None,
    ) -> None:
        self.params = params
        self.claims = claims
        self.server_round = server_round
        self.global_np = {k: v.numpy() for k, v in global_arrays.items()}
        self.layout = Layout.of(self.global_np)
        # the run's secure sums ride behind the delta (common/secure_sum.py)
        self.sum_spec = params.sum_spec
        self.length = self.layout.length + secure_sum.length(self.sum_spec)
        self.transport = transport
        self.session = secrets.token_bytes(schema.SESSION_BYTES)
        self.report = RoundReport(server_round=server_round)

    # ---------------------------------------------------------------- plumbing
    def _header(self, stage: str) -> schema.Header:
        return schema.Header(stage=stage, server_round=self.server_round, session=self.session)

    def _send(self, stage: str, contents: dict[int, RecordDict]) -> dict[int, RecordDict]:
        t0 = time.perf_counter()
        for node, c in contents.items():
            self.report.bytes_down[node] = self.report.bytes_down.get(node, 0) + content_nbytes(c)
        replies = self.transport(stage, contents)
        ok: dict[int, RecordDict] = {}
        dropped: dict[int, str] = {}
        for node in contents:
            reply = replies.get(node)
            if reply is None:
                dropped[node], kind = NO_REPLY, FAULT_LATE
            elif isinstance(reply, Error):
                dropped[node] = reply.reason or f"error code {reply.code}"
                kind = FAULT_DROPPED if reply.code == ErrorCode.NODE_UNAVAILABLE else FAULT_FAILED
            elif isinstance(reply, str):
                dropped[node], kind = reply, FAULT_FAILED
            else:
                self.report.bytes_up[node] = self.report.bytes_up.get(node, 0) + content_nbytes(
                    reply
                )
                ok[node] = reply
                continue
            self.report.note_fault(node, stage=stage, kind=kind, reason=dropped[node])
        if dropped:
            self.report.dropped[stage] = dropped
            log.warning(
                "secagg round %d, %s: sites %s dropped", self.server_round, stage, sorted(dropped)
            )
        self.report.seconds[stage] = time.perf_counter() - t0
        return ok

    def _exclude(self, node: int, stage: str, exc: Exception) -> None:
        self.report.excluded[node] = f"{stage}: {exc}"
        self.report.note_fault(node, stage=stage, kind=FAULT_EXCLUDED, reason=str(exc))
        log.warning(
            "secagg round %d: excluding site %d (%s: %s)", self.server_round, node, stage, exc
        )

    def _require(self, alive: int, needed: int, stage: str) -> None:
        if alive < needed:
            raise SecAggAbortedError(
                f"secure aggregation round {self.server_round} aborted at {stage}: only "
                f"{alive} sites left, {needed} needed (at least 2, and a secagg.threshold "
                "majority of each neighbourhood); the global model is not updated this round"
            )

    # ------------------------------------------------------------------ stages
    def run(self, train_contents: Mapping[int, RecordDict]) -> RoundResult:
        """Run all four stages for the sites in ``train_contents``.

        Parameters
        ----------
        train_contents : Mapping[int, RecordDict]
            The strategy's train message content per node (global arrays + config).

        Returns
        -------
        RoundResult

        Raises
        ------
        SecAggAbortedError
            Too few sites survived a stage (the report says which and why).

        """
        self.report.sampled = sorted(train_contents)
        try:
            result = self._run(train_contents)
        except SecAggAbortedError as exc:
            self.report.status, self.report.reason = "failed", str(exc)
            raise
        self.report.status = "ok"
        return result

    def _run(self, train_contents: Mapping[int, RecordDict]) -> RoundResult:
        """Run the four stages in order, each reading and extending one :class:`RoundState`."""
        self.report.masked_length = self.length
        state = RoundState()
        self._advertise_keys(state, train_contents)
        self._share_keys(state)
        self._collect_masked_input(state)
        self._unmask(state)
        return self._result(state)

    # -- stage 0: advertise keys (sites train here)
    def _advertise_keys(self, state: RoundState, train_contents: Mapping[int, RecordDict]) -> None:
        """Send the train content with the round header; keep each site's keys and weight.

        Sets ``adverts``, ``weights``, ``metrics``, ``graph``, ``threshold``,
        ``total_weight`` and ``step`` of ``state``.
        """
        hdr = self._header(ADVERTISE).record()
        requests = {}
        for node, content in train_contents.items():
            req = RecordDict(dict(content.items()))
            req.config_records[RECORD] = hdr
            requests[node] = req
        for node, reply in self._send(ADVERTISE, requests).items():
            try:
                advert, weight, metrics = self._parse_advert(node, reply)
            except SecAggProtocolError as exc:
                self._exclude(node, ADVERTISE, exc)
                continue
            state.adverts[node] = advert
            state.weights[node], state.metrics[node] = weight, metrics
        u1 = sorted(state.adverts)
        self._require(len(u1), 2, ADVERTISE)
        state.graph = neighbourhoods(u1, k=self.params.neighbours)
        holders = min(len(v) for v in state.graph.values())
        state.threshold = self.params.shares_needed(holders)
        self._require(len(u1), state.threshold, ADVERTISE)
        state.total_weight = sum(state.weights.values())
        state.step = quantisation_step(
            clip_range=self.params.clip_range, total_weight=state.total_weight
        )
        self.report.step = state.step

    def _parse_advert(
        self, node: int, reply: RecordDict
    ) -> tuple[schema.AdvertiseReply, float, MetricRecord]:
        """Return a site's advertisement, its weight and its train metrics.

        Raises
        ------
        SecAggProtocolError
            A malformed reply, a weight that is not a positive number, or one the claim
            registry refuses (checked before any mask depends on it).

        """
        advert = schema.AdvertiseReply.parse(_record(reply))
        if len(reply.metric_records) != 1:
            raise SecAggProtocolError("advertise reply needs exactly one MetricRecord")
        m = next(iter(reply.metric_records.values()))
        w = m.get(WEIGHT_KEY)
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w < 2**40:
            raise SecAggProtocolError(f"{WEIGHT_KEY!r} must be a positive number")
        if self.claims is not None and (
            why := self.claims.check(node, w, server_round=self.server_round)
        ):
            raise SecAggProtocolError(why)  # before any mask depends on w
        return advert, float(w), m

    # -- stage 1: share keys
    def _share_keys(self, state: RoundState) -> None:
        """Send each site its neighbours' public keys; route the encrypted shares.

        Sets ``shared`` (the sites whose shares went out) and ``outbox`` of ``state``.
        """
        hdr = self._header(SHARE_KEYS)
        requests = {}
        for u in sorted(state.adverts):
            nb = state.graph[u]
            req = schema.ShareKeysRequest(
                nodes=nb,
                enc_pks=[state.adverts[v].enc_pk for v in nb],
                mask_pks=[state.adverts[v].mask_pk for v in nb],
                threshold=self.params.shares_needed(len(nb)),
                total_weight=state.total_weight,
            )
            requests[u] = RecordDict({RECORD: hdr.record(**req.fields())})
        for u, reply in self._send(SHARE_KEYS, requests).items():
            try:
                ct = schema.parse_share_keys_reply(_record(reply))
                if sorted(ct.peers) != [v for v in state.graph[u] if v != u]:
                    raise SecAggProtocolError("shares must go to exactly the neighbours")
            except SecAggProtocolError as exc:
                self._exclude(u, SHARE_KEYS, exc)
                continue
            state.shared.append(u)
            for dst, c in zip(ct.peers, ct.ciphertexts, strict=True):
                state.outbox.setdefault(dst, {})[u] = c
        self._require(len(state.shared), state.threshold, SHARE_KEYS)

    # -- stage 2: masked input
    def _collect_masked_input(self, state: RoundState) -> None:
        """Deliver the shares; sum the masked vectors of the sites that stay in the sum.

        Sets ``active``, ``survivors``, ``gone`` and ``total`` (the masked sum) of
        ``state``. A site whose shares failed authentication at a neighbour is excluded:
        its input leaves the sum and its pairwise masks are removed like a dropped site's.

        Raises
        ------
        SecAggAbortedError
            Two survivors disagree on their pairwise masks, or too few survive.

        """
        hdr = self._header(MASKED_INPUT)
        shared = set(state.shared)
        requests = {}
        sent_src: dict[int, list[int]] = {}
        for v in state.shared:
            srcs = sorted(u for u in state.outbox.get(v, {}) if u in shared)
            sent_src[v] = srcs
            cts = schema.Ciphertexts(srcs, [state.outbox[v][u] for u in srcs])
            requests[v] = RecordDict({RECORD: hdr.record(**cts.fields("src"))})
        vectors: dict[int, NDArray[np.uint32]] = {}
        rejected_by: dict[int, int] = {}
        for v, reply in self._send(MASKED_INPUT, requests).items():
            try:
                vec, act, rej = schema.parse_masked_input_reply(reply, length=self.length)
                if sorted(act + rej) != sent_src[v]:
                    raise SecAggProtocolError("active + rejected must be the senders it was sent")
            except SecAggProtocolError as exc:
                self._exclude(v, MASKED_INPUT, exc)
                continue
            state.active[v], vectors[v] = set(act), vec
            for u in rej:
                rejected_by.setdefault(u, v)
        for u, v in sorted(rejected_by.items()):
            self._exclude(u, MASKED_INPUT, SecAggProtocolError(f"site {v} rejected its shares"))
        state.survivors = set(state.active) - set(rejected_by)
        state.total = np.zeros(self.length, dtype=np.uint32)
        for v in sorted(state.survivors):
            state.total += vectors.pop(v)
        vectors.clear()
        # pairwise consistency among survivors
        for a, b in itertools.combinations(sorted(state.survivors), 2):
            if (b in state.active[a]) != (a in state.active[b]):
                raise SecAggAbortedError(
                    f"sites {a} and {b} disagree on their pairwise masks; aborting the round"
                )
        self._require(len(state.survivors), max(state.threshold, 2), MASKED_INPUT)
        state.gone = shared - state.survivors  # shared keys, but their input is not in the sum

    # -- stage 3: unmask
    def _unmask(self, state: RoundState) -> None:
        """Collect the shares that rebuild the masks; remove them from ``state.total``.

        The survivors' self-masks come off with their rebuilt seeds; the pairwise masks
        that survivors added for sites that left come off with those sites' rebuilt mask
        keys (:func:`common.secagg.crypto.pairwise_mask`, the sites' own convention).
        """
        seed_shares, key_shares = self._collect_shares(state)
        for u in sorted(state.survivors):
            seed = self._rebuild(
                u,
                seed_shares.get(u, []),
                self.params.shares_needed(len(state.graph[u])),
                derive=crypto.commit,
                expected=state.adverts[u].seed_commit,
                what="self-mask seed",
            )
            state.total -= crypto.expand_mask(seed, length=self.length)
        for u in sorted(state.gone):
            partners = [v for v in state.survivors if u in state.active[v]]
            if not partners:
                continue
            sk = self._rebuild(
                u,
                key_shares.get(u, []),
                self.params.shares_needed(len(state.graph[u])),
                derive=crypto.public_key,
                expected=state.adverts[u].mask_pk,
                what="mask key",
            )
            for v in partners:  # undo the term v added for u
                state.total -= crypto.pairwise_mask(
                    private_key=sk,
                    peer_public_key=state.adverts[v].mask_pk,
                    session=self.session,
                    node=v,
                    peer=u,
                    length=self.length,
                )

    def _collect_shares(self, state: RoundState) -> tuple[_Shares, _Shares]:
        """Ask each survivor for its neighbours' shares: seeds of survivors, keys of the gone.

        Returns
        -------
        tuple of dict
            ``(seed shares, mask-key shares)``, each ``{site: [(holder index, share)]}``.

        """
        hdr = self._header(UNMASK)
        requests = {}
        for w in sorted(state.survivors):
            req = schema.UnmaskRequest(
                survivors=[u for u in state.graph[w] if u in state.survivors],
                dropped=[u for u in state.graph[w] if u in state.gone],
                num_survivors=len(state.survivors),
            )
            requests[w] = RecordDict({RECORD: hdr.record(**req.fields())})
        seed_shares: _Shares = {}
        key_shares: _Shares = {}
        for w, reply in self._send(UNMASK, requests).items():
            try:
                un = schema.UnmaskReply.parse(_record(reply))
                asked = schema.UnmaskRequest.parse(requests[w].config_records[RECORD])
                if not set(un.seed_nodes) <= set(asked.survivors) or not set(un.key_nodes) <= set(
                    asked.dropped
                ):
                    raise SecAggProtocolError("revealed shares that were not asked for")
            except SecAggProtocolError as exc:
                self._exclude(w, UNMASK, exc)
                continue
            for u, s in zip(un.seed_nodes, un.seed_shares, strict=True):
                seed_shares.setdefault(u, []).append((state.graph[u].index(w) + 1, s))
            for u, s in zip(un.key_nodes, un.key_shares, strict=True):
                key_shares.setdefault(u, []).append((state.graph[u].index(w) + 1, s))
        return seed_shares, key_shares

    def _result(self, state: RoundState) -> RoundResult:
        """Decode the unmasked sum into the weighted mean delta and the new global arrays."""
        survivors = sorted(state.survivors)
        total_weight = sum(state.weights[v] for v in survivors)
        mean = decode_mean(state.total, step=state.step, total_weight=total_weight)
        mean_delta = mean[: self.layout.length]
        self.report.survivors = survivors
        self.report.total_weight = total_weight
        return RoundResult(
            arrays=apply_mean_delta(self.global_np, mean_delta, layout=self.layout),
            mean_delta=mean_delta,
            survivors=survivors,
            total_weight=total_weight,
            metrics={v: state.metrics[v] for v in survivors},
            sums=secure_sum.from_mean(
                mean[self.layout.length :], self.sum_spec, total_weight=total_weight
            ),
        )

    def _rebuild(
        self,
        node: int,
        shares: list[tuple[int, bytes]],
        t: int,
        *,
        derive: Callable[[bytes], bytes],
        expected: bytes,
        what: str,
    ) -> bytes:
        """Combine ``t`` of ``shares``; keep the secret with ``derive(secret) == expected``.

        The check is the site's own advertisement: the SHA-256 commitment of its seed or
        its mask public key. If a holder sent a wrong share, other ``t``-subsets are tried
        (at most :data:`MAX_COMBINATIONS`).
        """
        if len(shares) < t:
            raise SecAggAbortedError(
                f"secure aggregation round {self.server_round} aborted at unmask: "
                f"{len(shares)} shares of site {node}'s {what}, {t} needed (too many sites "
                "dropped after sending their masked input)"
            )
        for subset in itertools.islice(itertools.combinations(shares, t), MAX_COMBINATIONS):
            try:
                secret = crypto.combine_secret(list(subset))
            except SecAggProtocolError:
                continue
            if derive(secret) == expected:
                return secret
        raise SecAggAbortedError(
            f"secure aggregation round {self.server_round}: no {t} shares rebuild site "
            f"{node}'s {what} (a holder sent wrong shares)"
        )


def _record(content: RecordDict) -> Any:
    rec = content.config_records.get(RECORD)
    if rec is None:
        raise SecAggProtocolError("reply lacks the secagg record")
    return rec


@dataclass
class _Exchange:
    """One secure round as :class:`SecAggGrid` ran it: what it sent and what came back."""

    round: SecAggRound
    #: The last message sent to each site (a reply answers it).
    last_sent: dict[int, Message]
    #: Sites that answered at least one stage.
    answered: set[int]
    #: The unmasked outcome, or None when the round aborted.
    result: RoundResult | None = None
    #: Why the round aborted.
    aborted: SecAggAbortedError | None = None


class SecAggGrid(DelegatingGrid):
    """A ``Grid`` that runs SecAgg+ for every batch of ``train`` messages.

    All other calls (and ``query`` messages) go to the wrapped grid; so do ``evaluate``
    messages unless ``secure_validation`` is on. See the module docstring for why the
    protocol sits here and what the strategy sees.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The real grid (deployment or simulation).
    params : SecAggConfig
        From the run config.
    run_dir : pathlib.Path, optional
        Receives ``secagg.jsonl`` (one line per secure round).
    claims : server.claims.ClaimRegistry, optional
        Passed to every :class:`SecAggRound`.
    secure_validation : bool
        Run ``evaluate`` messages as validate-only secure rounds (config
        :data:`common.secure_sum.VALIDATE_KEY`): the sites validate the model without
        training and their score histograms reach the coordinator only as their sum.
        With ``evaluate-in-train`` the only evaluate exchange is the final model's, which
        otherwise would have no operating point (:mod:`common.secure_sum`).

    """

    def __init__(
        self,
        grid: Grid,
        *,
        params: SecAggConfig,
        run_dir: Path | None = None,
        claims: ClaimRegistry | None = None,
        secure_validation: bool = False,
    ) -> None:
        super().__init__(grid)
        self.params = params
        self.claims = claims
        self.run_dir = run_dir
        self.secure_validation = secure_validation
        self.reports: list[RoundReport] = []

    # ------------------------------------------------------------- the protocol
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run SecAgg+ for ``train`` messages (and ``evaluate`` ones, see above).

        Returns
        -------
        Iterable[Message]
            For ``train``: one reply per surviving site carrying the unmasked weighted
            mean model and the site's train metrics (plus ``secagg-bytes-up``, what it
            really uploaded), and one error reply per site that failed, dropped or was
            excluded after answering at least once. If the round aborts, error replies
            for every site that answered, naming the reason. For ``evaluate`` under
            ``secure_validation``: the same, as evaluate replies (:meth:`_validate`).
            Anything else: the wrapped grid's replies.

        """
        messages = list(messages)
        types = {m.metadata.message_type for m in messages}
        if types == {MessageType.EVALUATE} and self.secure_validation:
            return self._validate(messages, timeout)
        if types != {MessageType.TRAIN}:
            return self._grid.send_and_receive(messages, timeout=timeout)
        group_id = messages[0].metadata.group_id
        contents = {m.metadata.dst_node_id: m.content for m in messages}
        config = messages[0].content.config_records.get("config")
        census = config is not None and config.get(secure_sum.CENSUS_KEY) is True
        purpose = PURPOSE_CENSUS if census else PURPOSE_TRAIN
        ex = self._exchange(contents, group_id, _common_arrays(messages), purpose, timeout)
        if ex.result is None:
            return self._aborted(ex, ex.last_sent)
        result, rnd = ex.result, ex.round
        replies: list[Message] = []
        sums_attached = False
        for node in sorted(ex.answered):
            sent = ex.last_sent[node]
            if node not in result.survivors:
                error = _failure(rnd.report, node, "secagg: left the round")
                replies.append(Message(error, reply_to=sent))
                continue
            metrics = MetricRecord(dict(result.metrics[node]))
            metrics["secagg-bytes-up"] = rnd.report.bytes_up.get(node, 0)
            arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in result.arrays.items()})
            content = RecordDict({"arrays": arrays, "metrics": metrics})
            if result.sums and not sums_attached:
                # The round's secure sum rides on the first survivor's reply only:
                # the strategy adds what replies carry, so it counts once.
                content[secure_sum.RECORD] = secure_sum.to_record(result.sums)
                sums_attached = True
            replies.append(Message(content, reply_to=sent))
        return replies

    def _validate(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Run ``evaluate`` messages as one validate-only secure round.

        Each site gets a ``train`` message with the evaluate message's model and config
        plus :data:`common.secure_sum.VALIDATE_KEY`; it validates without training, so
        the unmasked mean is the model itself and the secure sum holds the pooled score
        histogram. Each site that validated gets an evaluate reply with ``num-examples``
        (its validation count) and its ``val-*`` metrics, as a plain evaluate reply has;
        the first of them also carries the summed histogram. A site that left the round,
        or whose policy refused the validation, gets an error reply.
        """
        group_id = messages[0].metadata.group_id
        contents: dict[int, RecordDict] = {}
        for m in messages:
            content = RecordDict(dict(m.content.items()))
            config = ConfigRecord(dict(m.content.config_records.get("config", {})))
            config[secure_sum.VALIDATE_KEY] = True
            content["config"] = config
            contents[m.metadata.dst_node_id] = content
        originals = {m.metadata.dst_node_id: m for m in messages}
        ex = self._exchange(contents, group_id, _common_arrays(messages), PURPOSE_VALIDATE, timeout)
        if ex.result is None:
            return self._aborted(ex, originals)
        result, report = ex.result, ex.round.report
        histogram = {k: v for k, v in result.sums.items() if k == secure_sum.SCORE_HISTOGRAM}
        replies: list[Message] = []
        for node in sorted(ex.answered):
            sent = originals[node]
            site = result.metrics.get(node) if node in result.survivors else None
            if site is None:
                error = _failure(report, node, "secagg: left the round")
                replies.append(Message(error, reply_to=sent))
                continue
            val_count = site.get(VAL_COUNT)
            if not isinstance(val_count, int) or val_count <= 0:
                error = Error(code=ABORT_CODE, reason="the site did not validate the model")
                replies.append(Message(error, reply_to=sent))
                continue
            metrics = MetricRecord(
                {"num-examples": val_count}
                | {k: v for k, v in site.items() if k.startswith("val-") and k != VAL_COUNT}
            )
            content = RecordDict({"metrics": metrics})
            if histogram:
                content[secure_sum.RECORD] = secure_sum.to_record(histogram)
                histogram = {}
            replies.append(Message(content, reply_to=sent))
        return replies

    def _exchange(
        self,
        contents: dict[int, RecordDict],
        group_id: str,
        global_arrays: ArrayRecord,
        purpose: str,
        timeout: float | None,
    ) -> _Exchange:
        """Run one secure round over the real grid; record it in ``secagg.jsonl``."""
        server_round = int(group_id) if group_id.isdigit() else len(self.reports) + 1
        last_sent: dict[int, Message] = {}
        answered: set[int] = set()

        def transport(
            stage: str, stage_contents: dict[int, RecordDict]
        ) -> dict[int, RecordDict | Error | str]:
            out_msgs = [
                self._grid.create_message(c, MessageType.TRAIN, node, group_id)
                for node, c in stage_contents.items()
            ]
            out: dict[int, RecordDict | Error | str] = {}
            for m in out_msgs:
                last_sent[m.metadata.dst_node_id] = m
            for reply in self._grid.send_and_receive(out_msgs, timeout=timeout):
                node = reply.metadata.src_node_id
                if node not in stage_contents:
                    continue
                answered.add(node)
                out[node] = reply.error if reply.has_error() else reply.content
            return out

        rnd = SecAggRound(
            params=self.params,
            server_round=server_round,
            global_arrays=global_arrays,
            transport=transport,
            claims=self.claims,
        )
        rnd.report.purpose = purpose
        ex = _Exchange(rnd, last_sent, answered)
        try:
            ex.result = rnd.run(contents)
        except SecAggAbortedError as exc:
            log.error("%s", exc)
            ex.aborted = exc
        self._record(rnd.report)
        if ex.result is not None:
            log.info(
                "secagg round %d (%s): unmasked the sum of %d sites (%.2f bytes/parameter up)",
                server_round,
                purpose,
                len(ex.result.survivors),
                sum(rnd.report.bytes_up[v] for v in ex.result.survivors)
                / max(1, rnd.length * len(ex.result.survivors)),
            )
        return ex

    @staticmethod
    def _aborted(ex: _Exchange, reply_to: Mapping[int, Message]) -> list[Message]:
        """Error replies for every site that answered an aborted round."""
        # a site that failed on its own keeps its own reason; the others get the abort's
        return [
            Message(_failure(ex.round.report, node, str(ex.aborted)), reply_to=reply_to[node])
            for node in sorted(ex.answered)
        ]

    def _record(self, report: RoundReport) -> None:
        self.reports.append(report)
        if self.run_dir is not None:
            with (self.run_dir / SECAGG_LOG).open("a") as fh:
                fh.write(json.dumps(report.as_json(), sort_keys=True) + "\n")


def _failure(report: RoundReport, node: int, default: str) -> Error:
    """Return the error reply content for ``node``, which is not in the round's sum.

    A site that was late or went away keeps ``ErrorCode.NODE_UNAVAILABLE`` (the round
    log counts it as dropped, as without secure aggregation); one that failed or was
    excluded gets :data:`ABORT_CODE` with its own reason; any other gets ``default``.
    """
    fault = report.faults.get(node)
    reason = _own_failure(report, node) or default
    if fault is not None and fault["kind"] in (FAULT_LATE, FAULT_DROPPED):
        return Error(code=int(ErrorCode.NODE_UNAVAILABLE), reason=reason)
    return Error(code=ABORT_CODE, reason=reason)


def _own_failure(report: RoundReport, node: int) -> str | None:
    """Return why ``node`` left the round by itself (excluded, error, no reply), if it did."""
    if node in report.excluded:
        return f"secagg: excluded at {report.excluded[node]}"
    for stage, dropped in report.dropped.items():
        if node in dropped:
            return f"secagg {stage}: {dropped[node]}"
    return None


def _common_arrays(messages: list[Message]) -> ArrayRecord:
    """Return the one global model every train message carries.

    Raises
    ------
    SecAggProtocolError
        If a message has no single ArrayRecord or the sites got different models
        (personalised strategies cannot use secure aggregation of deltas).

    """
    records = [m.content.array_records for m in messages]
    if any(len(r) != 1 for r in records):
        raise SecAggProtocolError("every train message must carry exactly one ArrayRecord")
    first = next(iter(records[0].values()))
    ref = {k: v.numpy() for k, v in first.items()}
    for r in records[1:]:
        other = next(iter(r.values()))
        if list(other) != list(ref) or any(
            not np.array_equal(other[k].numpy(), ref[k]) for k in ref
        ):
            raise SecAggProtocolError(
                "secure aggregation needs the same global model in every train message"
            )
    return first
