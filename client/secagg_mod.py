"""Site side of secure aggregation: a Flower client mod that speaks SecAgg+.

The coordinator (``server/secagg.py``) runs four stages per training round, each a
``train`` message carrying a ``secagg`` ``ConfigRecord`` (Bell et al., CCS 2020,
Algorithm 2; Bonawitz et al., CCS 2017, Figure 4):

1. ``advertise-keys``: the mod runs the normal train handler (DP, if configured,
   happens inside it, so everything masked later is already clipped and noised), keeps
   the trained-minus-global delta in ``context.state``, and replies with two fresh
   X25519 public keys, a SHA-256 commitment to a fresh self-mask seed, and the train
   metrics (``num-examples`` is the FedAvg weight). Training happens here rather than at
   the masking stage because every site's quantisation step depends on the advertised
   sites' total weight (see :mod:`common.secagg.encoding`).
2. ``share-keys``: Shamir-shares its mask private key and its seed among its
   neighbours, each bundle encrypted with AES-256-GCM under an X25519+HKDF key.
3. ``masked-input``: decrypts the shares it received, then replies with the only array
   that ever leaves the site: ``y = q + PRG(b) + sum_v +-PRG(s_uv) mod 2^32`` (uint32).
4. ``unmask``: reveals seed shares of surviving neighbours and mask-key shares of
   dropped ones, never both for the same site, and wipes its round secrets.

Each ClientApp message may run in a fresh process, so the round's secrets and the delta
live in ``context.state`` (as Flower's own ``secaggplus_mod`` does), through
:meth:`SiteSecAggState.state_dict` / :meth:`SiteSecAggState.load_state_dict`. The state
never leaves the site. A message out of order, for another round, or malformed is
refused with an error reply and the round state is wiped.

Mod order in the ClientApp: the egress guard outermost, this mod inside it, so the guard
checks the masked vector that actually leaves.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from numpy.typing import NDArray

from client.site.job import job_of
from common import secure_sum
from common.config import SecAggConfig
from common.errors import ConfigError, DataError
from common.replies import ReplyCode
from common.secagg import crypto, schema
from common.secagg.encoding import Layout, check_clip_range, encode, flat_delta, quantisation_step
from common.secagg.errors import SecAggError, SecAggProtocolError
from common.secagg.params import ADVERTISE, MASKED_INPUT, RECORD, SHARE_KEYS, UNMASK, WEIGHT_KEY

log = logging.getLogger(__name__)

# What this mod sends is checked by the egress guard's explicit schema per stage
# (client/egress.py PROTOCOL_RECORDS): nothing is registered on import.

STATE_RECORD = "medfed.secagg"
STATE_DELTA = "medfed.secagg.delta"
#: Error code of a refused secagg message: the one code of a SecAgg+ refusal
#: (common.errors.CODES); the site service replaces the reason by the fixed one.
ERROR_CODE = int(ReplyCode.SECAGG)


@dataclass
class SiteSecAggState:
    """One site's secure-aggregation state for the current round.

    Secrets (``enc_sk``, ``mask_sk``, ``seed``, received shares) stay on the site; the
    state is wiped after ``unmask`` and on any error.
    """

    stage: str = ""
    server_round: int = -1
    session: bytes = b""
    node_id: int = 0
    enc_sk: bytes = b""
    mask_sk: bytes = b""
    seed: bytes = b""
    weight: float = 0.0
    nodes: list[int] = field(default_factory=list)
    enc_pks: list[bytes] = field(default_factory=list)
    mask_pks: list[bytes] = field(default_factory=list)
    threshold: int = 0
    step: float = 0.0
    own_key_share: bytes = b""
    own_seed_share: bytes = b""
    share_src: list[int] = field(default_factory=list)
    share_key: list[bytes] = field(default_factory=list)
    share_seed: list[bytes] = field(default_factory=list)
    delta: NDArray[np.float64] | None = None

    def state_dict(self) -> tuple[ConfigRecord, ArrayRecord | None]:
        """Serialise to a ``ConfigRecord`` (scalars, keys, shares) and the delta array."""
        values: dict[str, Any] = {
            k: v for k, v in self.__dict__.items() if k != "delta" and not _empty_list(v)
        }
        delta = None if self.delta is None else ArrayRecord({"delta": Array(self.delta)})
        return ConfigRecord(values), delta

    def load_state_dict(self, config: ConfigRecord, delta: ArrayRecord | None) -> None:
        """Inverse of :meth:`state_dict`."""
        fresh = SiteSecAggState()
        self.__dict__.update(fresh.__dict__)
        for key, value in config.items():
            if key not in self.__dict__ or key == "delta":
                raise SecAggProtocolError(f"unknown key {key!r} in the stored secagg state")
            setattr(self, key, list(value) if isinstance(value, list) else value)
        self.delta = None if delta is None else delta["delta"].numpy().astype(np.float64)

    @classmethod
    def from_context(cls, context: Context, *, with_delta: bool = False) -> SiteSecAggState:
        """Load the state kept in ``context.state`` (empty if none).

        The delta (``L`` float64 values) is decoded only if ``with_delta``: only the
        masking stage needs it.
        """
        state = cls()
        if STATE_RECORD in context.state.config_records:
            delta = context.state.array_records.get(STATE_DELTA) if with_delta else None
            state.load_state_dict(context.state.config_records[STATE_RECORD], delta)
        return state

    def save(self, context: Context, *, drop_delta: bool = False) -> None:
        """Store in ``context.state``.

        A stored delta is replaced when this state holds one, removed when
        ``drop_delta``, and otherwise left as it is (it is not re-encoded every stage).
        """
        config, delta = self.state_dict()
        context.state.config_records[STATE_RECORD] = config
        if delta is not None:
            context.state.array_records[STATE_DELTA] = delta
        elif drop_delta:
            context.state.array_records.pop(STATE_DELTA, None)


def _empty_list(v: Any) -> bool:
    return isinstance(v, list) and not v


def _check_step(state: SiteSecAggState, header: schema.Header, *, expected: str) -> None:
    if state.stage != expected:
        raise SecAggProtocolError(
            f"secagg stage {header.stage!r} arrived after {state.stage or 'nothing'!r}; "
            f"it must follow {expected!r}"
        )
    if (header.server_round, header.session) != (state.server_round, state.session):
        raise SecAggProtocolError(f"secagg {header.stage!r} message belongs to another round")


# ----------------------------------------------------------------- stage handlers
def advertise_keys(
    *,
    node_id: int,
    header: schema.Header,
    train_reply: RecordDict,
    global_arrays: ArrayRecord,
    params: SecAggConfig,
) -> tuple[SiteSecAggState, RecordDict]:
    """Stage 0: keep the trained delta, create the round's keys, advertise public keys.

    Parameters
    ----------
    node_id : int
        This site's Flower node id.
    header : schema.Header
        The request header (round, session nonce).
    train_reply : RecordDict
        The train handler's reply: one ``ArrayRecord`` (trained state) and one
        ``MetricRecord`` with ``num-examples``.
    global_arrays : ArrayRecord
        The global model the site received.
    params : SecAggConfig
        The run's secure-aggregation settings (clip range, secure sums). The train
        reply's :data:`common.secure_sum.RECORD` (zeros if it has none this round) is
        appended to the delta as ``counts / (num-examples * SCALE)``, so the unmasked
        weighted mean reveals only their sum over sites (``params.sum_spec``).

    Returns
    -------
    tuple[SiteSecAggState, RecordDict]
        The new state and the reply content (secagg record + train metrics; no arrays).

    Raises
    ------
    ClipRangeError
        If the delta leaves ``[-clip-range, clip-range]``.
    SecAggProtocolError
        If the train reply is not one ArrayRecord plus one MetricRecord with a positive
        ``num-examples``, or a non-float array changed.

    """
    sum_spec = params.sum_spec
    model_records = [k for k in train_reply.array_records if k != secure_sum.RECORD]
    sums = train_reply.array_records.get(secure_sum.RECORD)
    if len(model_records) != 1 or len(train_reply.metric_records) != 1:
        raise SecAggProtocolError("train reply must hold one ArrayRecord and one MetricRecord")
    if sums is not None and not sum_spec:
        raise SecAggProtocolError("train reply holds a secure-sum record the run does not use")
    trained = train_reply.array_records[model_records[0]]
    metrics_name, metrics = next(iter(train_reply.metric_records.items()))
    weight = metrics.get(WEIGHT_KEY)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise SecAggProtocolError(f"train metrics need a positive {WEIGHT_KEY!r}, got {weight!r}")
    global_np = {k: v.numpy() for k, v in global_arrays.items()}
    layout = Layout.of(global_np)
    delta = flat_delta(
        trained={k: v.numpy() for k, v in trained.items()}, global_state=global_np, layout=layout
    )
    try:
        extra = secure_sum.to_masked(
            None if sums is None else {k: v.numpy() for k, v in sums.items()},
            sum_spec,
            weight=float(weight),
        )
    except DataError as exc:
        raise SecAggProtocolError(f"secure-sum record: {exc}") from None
    delta = np.concatenate([delta, extra])
    check_clip_range(delta, clip_range=params.clip_range)
    state = SiteSecAggState(
        stage=ADVERTISE,
        server_round=header.server_round,
        session=header.session,
        node_id=node_id,
        enc_sk=crypto.generate_private_key(),
        mask_sk=crypto.generate_private_key(),
        seed=crypto.random_seed(),
        weight=float(weight),
        delta=delta,
    )
    reply = schema.AdvertiseReply(
        enc_pk=crypto.public_key(state.enc_sk),
        mask_pk=crypto.public_key(state.mask_sk),
        seed_commit=crypto.commit(state.seed),
    )
    content = RecordDict({metrics_name: MetricRecord(dict(metrics)), RECORD: reply.record()})
    return state, content


def share_keys(
    state: SiteSecAggState,
    *,
    header: schema.Header,
    request: schema.ShareKeysRequest,
    params: SecAggConfig,
) -> RecordDict:
    """Stage 1: Shamir-share ``mask_sk`` and ``seed``; encrypt each neighbour's shares.

    Raises
    ------
    SecAggProtocolError
        If this site or its keys are missing from the neighbourhood, the threshold is not
        the one the run config implies, or the total weight is implausible.

    """
    _check_step(state, header, expected=ADVERTISE)
    if state.node_id not in request.nodes:
        raise SecAggProtocolError("share-keys neighbourhood does not include this site")
    me = request.nodes.index(state.node_id)
    if request.enc_pks[me] != crypto.public_key(state.enc_sk) or request.mask_pks[
        me
    ] != crypto.public_key(state.mask_sk):
        raise SecAggProtocolError("share-keys request does not echo this site's public keys")
    holders = len(request.nodes)
    expected_t = params.shares_needed(holders)
    if request.threshold != expected_t:
        raise SecAggProtocolError(
            f"server asked for threshold {request.threshold}, the run config implies "
            f"{expected_t} for {holders} holders"
        )
    if not request.total_weight >= state.weight:
        raise SecAggProtocolError("total weight is smaller than this site's own weight")
    key_shares = crypto.split_secret(state.mask_sk, threshold=expected_t, holders=holders)
    seed_shares = crypto.split_secret(state.seed, threshold=expected_t, holders=holders)
    dst: list[int] = []
    cts: list[bytes] = []
    for j, peer in enumerate(request.nodes):
        if peer == state.node_id:
            state.own_key_share, state.own_seed_share = key_shares[j], seed_shares[j]
            continue
        key = _share_key(state, peer, request.enc_pks[j])
        dst.append(peer)
        cts.append(
            crypto.encrypt_shares(
                key=key,
                session=state.session,
                server_round=state.server_round,
                src=state.node_id,
                dst=peer,
                index=j + 1,
                secret_key_share=key_shares[j],
                seed_share=seed_shares[j],
            )
        )
    state.nodes, state.enc_pks, state.mask_pks = request.nodes, request.enc_pks, request.mask_pks
    state.threshold = expected_t
    state.step = quantisation_step(clip_range=params.clip_range, total_weight=request.total_weight)
    state.stage = SHARE_KEYS
    return RecordDict({RECORD: schema.share_keys_reply(schema.Ciphertexts(dst, cts))})


def _share_key(state: SiteSecAggState, peer: int, peer_enc_pk: bytes) -> bytes:
    """Return the AES-256-GCM key of the share bundles between this site and ``peer``."""
    return crypto.agree(
        private_key=state.enc_sk,
        peer_public_key=peer_enc_pk,
        purpose=b"share-encryption",
        session=state.session,
        node_a=state.node_id,
        node_b=peer,
    )


def masked_input(
    state: SiteSecAggState,
    *,
    header: schema.Header,
    request: schema.Ciphertexts,
    params: SecAggConfig,
    rng: np.random.Generator | None = None,
) -> RecordDict:
    """Stage 2: keep received shares, reply with the masked ``uint32`` vector.

    ``y = Q(w * delta / s) + PRG(b) + sum_{v active} sign(u, v) PRG(s_uv)  (mod 2^32)``
    with ``sign = +1`` if ``u < v`` else ``-1`` (Bonawitz et al. 2017, section 3).
    A neighbour whose ciphertext fails authentication is left out of the masks and
    reported as ``rejected``.

    Raises
    ------
    SecAggProtocolError
        Wrong stage, senders outside the neighbourhood, or fewer active neighbours than
        the threshold needs (the server could not unmask without exposing this site).

    """
    _check_step(state, header, expected=SHARE_KEYS)
    if state.delta is None:
        raise SecAggProtocolError("no trained update stored for this round")
    active: list[int] = []
    rejected: list[int] = []
    for src, ct in zip(request.peers, request.ciphertexts, strict=True):
        if src == state.node_id or src not in state.nodes:
            raise SecAggProtocolError(f"shares from node {src}, which is not a neighbour")
        j = state.nodes.index(src)
        key = _share_key(state, src, state.enc_pks[j])
        try:
            _, key_share, seed_share = crypto.decrypt_shares(
                key=key,
                session=state.session,
                server_round=state.server_round,
                src=src,
                dst=state.node_id,
                ciphertext=ct,
            )
        except SecAggProtocolError as exc:
            log.warning("round %d: rejecting shares from node %d: %s", state.server_round, src, exc)
            rejected.append(src)
            continue
        active.append(src)
        state.share_src.append(src)
        state.share_key.append(key_share)
        state.share_seed.append(seed_share)
    if len(active) + 1 < state.threshold:
        raise SecAggProtocolError(
            f"only {len(active)} neighbours shared keys; {state.threshold - 1} are needed"
        )
    stochastic = params.quantisation == "stochastic"
    if stochastic and rng is None:
        # Rounding noise needs no secrecy, only independence; seeded from the OS.
        rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    vector = encode(
        state.delta, weight=state.weight, step=state.step, stochastic=stochastic, rng=rng
    )
    vector += crypto.expand_mask(state.seed, length=vector.size)
    for peer in active:
        vector += crypto.pairwise_mask(
            private_key=state.mask_sk,
            peer_public_key=state.mask_pks[state.nodes.index(peer)],
            session=state.session,
            node=state.node_id,
            peer=peer,
            length=vector.size,
        )
    state.delta = None  # the plaintext update is no longer needed
    state.stage = MASKED_INPUT
    return schema.masked_input_reply(vector, active=sorted(active), rejected=sorted(rejected))


def unmask(
    state: SiteSecAggState, *, header: schema.Header, request: schema.UnmaskRequest
) -> RecordDict:
    """Stage 3: reveal seed shares of survivors and mask-key shares of dropped sites.

    Raises
    ------
    SecAggProtocolError
        Wrong stage, this site not among the survivors, too few survivors, or nodes that
        are not neighbours.

    """
    _check_step(state, header, expected=MASKED_INPUT)
    if state.node_id not in request.survivors:
        raise SecAggProtocolError("unmask request does not list this site as a survivor")
    if request.num_survivors < state.threshold:
        raise SecAggProtocolError(
            f"only {request.num_survivors} sites survived; at least {state.threshold} must"
        )
    if not set(request.survivors) | set(request.dropped) <= set(state.nodes):
        raise SecAggProtocolError("unmask request names nodes outside this neighbourhood")
    held = dict(
        zip(state.share_src, zip(state.share_key, state.share_seed, strict=True), strict=True)
    )
    held[state.node_id] = (state.own_key_share, state.own_seed_share)
    seed_nodes = [u for u in request.survivors if u in held]
    key_nodes = [u for u in request.dropped if u in held and u != state.node_id]
    reply = schema.UnmaskReply(
        seed_nodes=seed_nodes,
        seed_shares=[held[u][1] for u in seed_nodes],
        key_nodes=key_nodes,
        key_shares=[held[u][0] for u in key_nodes],
    )
    return RecordDict({RECORD: reply.record()})


# ------------------------------------------------------------------------ the mod
def _without_secagg(content: RecordDict) -> RecordDict:
    return RecordDict({k: v for k, v in content.items() if k != RECORD})


def _handle(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    stage = schema.stage_of(msg.content)
    header = schema.Header.parse(msg.content.config_records[RECORD])
    params = job_of(context).run.secagg
    if stage == ADVERTISE:
        arrays = msg.content.array_records
        if len(arrays) != 1:
            raise SecAggProtocolError("advertise-keys must carry exactly the global model")
        original = msg.content
        msg.content = _without_secagg(original)  # the train handler sees a plain message
        try:
            reply = call_next(msg, context)
        finally:
            msg.content = original
        if reply.has_error():
            return reply
        state, content = advertise_keys(
            node_id=msg.metadata.dst_node_id,
            header=header,
            train_reply=reply.content,
            global_arrays=next(iter(arrays.values())),
            params=params,
        )
    else:
        state = SiteSecAggState.from_context(context, with_delta=stage == MASKED_INPUT)
        rec = msg.content.config_records[RECORD]
        if stage == SHARE_KEYS:
            content = share_keys(
                state, header=header, request=schema.ShareKeysRequest.parse(rec), params=params
            )
        elif stage == MASKED_INPUT:
            content = masked_input(
                state, header=header, request=schema.Ciphertexts.parse(rec, "src"), params=params
            )
        else:
            content = unmask(state, header=header, request=schema.UnmaskRequest.parse(rec))
            state = SiteSecAggState()  # the round is over: wipe its secrets
    state.save(context, drop_delta=stage in (MASKED_INPUT, UNMASK))
    return Message(content, reply_to=msg)


def _secagg_required(context: Context) -> bool:
    try:
        return job_of(context).run.secagg.enabled
    except ConfigError:
        return False  # the train handler reports the bad config itself


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: answer secure-aggregation stages; pass everything else through.

    Other message types go straight to ``call_next``, and so do ``train`` messages
    without a ``secagg`` record when the run config has ``secagg.enabled = false``. With
    it ``true`` such a message is refused: the site never sends a plaintext update in a
    run that promised secure aggregation (e.g. to a coordinator that forgot the wrapper).

    Returns
    -------
    flwr.app.Message
        The stage reply, or an error reply (:data:`ERROR_CODE`) naming the refused message; on error
        the round state is wiped, so the site takes no further part in that round.

    """
    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return call_next(msg, context)
    if RECORD not in msg.content.config_records:
        if _secagg_required(context):
            log.error("refusing a plaintext train message in a secure-aggregation run")
            return Message(
                Error(
                    code=ERROR_CODE,
                    reason="secagg: this run has secagg.enabled = true; the site does not "
                    "send plaintext updates (is the coordinator's SecAggGrid missing?)",
                ),
                reply_to=msg,
            )
        return call_next(msg, context)
    try:
        return _handle(msg, context, call_next)
    except SecAggError as exc:
        log.warning("secure aggregation refused a message: %s", exc)
        SiteSecAggState().save(context, drop_delta=True)
        return Message(Error(code=ERROR_CODE, reason=f"secagg: {exc}"), reply_to=msg)


__all__ = [
    "SiteSecAggState",
    "advertise_keys",
    "masked_input",
    "secagg_mod",
    "share_keys",
    "unmask",
]
