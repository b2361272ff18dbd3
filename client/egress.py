"""The egress guard: every reply is checked against an exact schema before it leaves.

The schema of a reply (:func:`reply_schema`) depends on the message type, the
secure-aggregation stage of the *request* (its ``secagg`` ``ConfigRecord``,
``common.secagg.schema.stage_of``) and the run config:

==============================  ===========================================================
reply to                        records it carries, exactly
==============================  ===========================================================
``train``, no SecAgg+           ``arrays`` (the model's ``state_dict`` spec) + ``metrics``
                                (+ ``scaffold-dc``, the trainable parameters' spec, only
                                with ``strategy = scaffold``; + ``medfed.secure-sum``,
                                validation score-histogram counts, only when
                                ``common.secure_sum.spec`` names them)
``train``, ``advertise-keys``   ``secagg`` (public keys, seed commitment) + ``metrics``
``train``, ``share-keys``       ``secagg`` (ciphertexts to the request's neighbours)
``train``, ``masked-input``     ``masked`` (one ``uint32`` vector of the model's float
                                length plus the secure-sum entries) + ``secagg`` (peers,
                                a subset of the request's)
``train``, ``unmask``           ``secagg`` (shares of the request's survivors / dropped)
``evaluate``                    ``metrics`` (+ ``medfed.secure-sum`` without SecAgg+)
==============================  ===========================================================

``metrics`` holds exactly names of the message type's table (``common.wire``: train
statistics, DP's ``epsilon``/``delta``/``dp-noise-multiplier`` when DP is on; ``val-``
+ the run task's metric names for evaluate), each a finite numeric scalar in its range.
A ``train`` reply without a stage in a run with ``secagg.enabled`` has no schema: the
plaintext update never leaves such a run. The protocol records (``secagg``, ``masked``,
``scaffold-dc``) are the explicit, fixed table :data:`PROTOCOL_RECORDS` in this module:
nothing registers records, on import or otherwise (importing client/secagg_mod.py or
client/scaffold.py changes nothing here).

The run config and the model's array specs come from the message's job
(client/site/job.py): the site service passes the one its handlers used (the model is
built once per message, its specs taken as built); called with a run config alone, the
guard resolves a job of its own.

Two entry points:

* :func:`check_reply`, which the site worker calls on every reply, raising
  :class:`~common.wire.EgressRefused` (``.code``, ``.detail``);
* :func:`egress_guard`, the same check as a Flower client mod (Flower 1.41 signature
  ``(Message, Context, ClientAppCallable) -> Message``, ``flwr/clientapp/typing.py``).
  It never lets an exception or a free-text reason out: the inner call's and its own
  exceptions become an ``INTERNAL`` error reply, a refused reply an ``EGRESS`` one, and
  an inner error reply passes only with a :class:`~common.replies.ReplyCode` and that
  code's :func:`~common.replies.fixed_reason`. Exceptions, tracebacks and replaced
  reasons go to the site's log.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from client.site.job import MessageJob, job_of
from common import secure_sum, wire
from common.config import RunConfig
from common.errors import DataError
from common.replies import ReplyCode, fixed_reason, parse_reason
from common.secagg.errors import SecAggError
from common.secagg.params import ADVERTISE, MASKED_INPUT, MASKED_RECORD, RECORD, SHARE_KEYS, UNMASK
from common.secagg.schema import (
    Ciphertexts,
    ShareKeysRequest,
    UnmaskRequest,
    check_reply_record,
    stage_of,
)
from common.wire import EgressRefused

__all__ = [
    "PROTOCOL_RECORDS",
    "EgressRefused",
    "ReplySchema",
    "check_reply",
    "egress_guard",
    "model_spec",
    "reply_schema",
    "vetted_error",
]

log = logging.getLogger(__name__)

#: Start of the site-log line of every refusal.
REASON_PREFIX = "egress guard refused the reply"

#: Name of SCAFFOLD's reply record (client/scaffold.py ``DELTA_RECORD``).
SCAFFOLD_DELTA_RECORD = "scaffold-dc"

#: Check of one reply record: raises :class:`EgressRefused` if it may not leave.
RecordCheck = Callable[[Any], None]


@dataclass(frozen=True)
class ReplySchema:
    """The exact records a reply may carry.

    Parameters
    ----------
    records : Mapping[str, RecordCheck]
        Record name -> its check.
    required : frozenset[str]
        Names that must be present.
    """

    records: Mapping[str, RecordCheck]
    required: frozenset[str]

    def check(self, content: RecordDict) -> None:
        """Check every record of ``content``.

        Raises
        ------
        EgressRefused
            ``record-name`` for a record outside the schema, ``record-missing`` for a
            required one absent, or whatever the record's check raises.
        """
        for name, record in content.items():
            check = self.records.get(name)
            if check is None:
                raise EgressRefused(
                    wire.RECORD_NAME,
                    f"a record outside the {sorted(self.records)} this reply may carry",
                )
            check(record)
        missing = sorted(self.required - set(content.keys()))
        if missing:
            raise EgressRefused(wire.RECORD_MISSING, f"record {missing[0]!r} is missing")


# ------------------------------------------------------------------ record specs
def model_spec(run_config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of the model the run config trains.

    Raises
    ------
    ConfigError, ModelError
        For an invalid run config or unknown model.
    """
    return dict(MessageJob(run_config=run_config, node_config={}).model_spec)


def _arrays_check(spec: wire.ArraySpec, name: str) -> RecordCheck:
    return lambda record: wire.check_arrays(record, spec, name=name)


def _metrics_check(rules: wire.MetricRules, allowed: frozenset[str] | None) -> RecordCheck:
    return lambda record: wire.check_metrics(record, rules, allowed=allowed)


def _secure_sum_check(run: RunConfig, *, only: str | None = None) -> RecordCheck:
    """Check the :mod:`common.secure_sum` record: exactly its arrays, finite counts >= 0.

    ``only``: the one array of the run's layout the reply may hold (an evaluate reply
    carries the score histogram alone).
    """
    run_spec = secure_sum.spec(run)
    if only is not None:
        run_spec = {only: run_spec[only]}
    arrays_spec = {k: (shape, secure_sum.DTYPE) for k, shape in run_spec.items()}

    def check(record: Any) -> None:
        wire.check_arrays(record, arrays_spec, name=secure_sum.RECORD)
        try:
            secure_sum.check_counts({k: v.numpy() for k, v in record.items()}, run_spec)
        except DataError as exc:
            raise EgressRefused(wire.ARRAY_SPEC, str(exc)) from None

    return check


# ------------------------------------------------------ secure-aggregation records
def _ids(record: ConfigRecord, key: str) -> list[int]:
    value = cast(list[int], record[key])  # check_reply_record checked: a list of ids
    if len(set(value)) != len(value):
        raise EgressRefused(wire.STAGE_RECORD, f"field {key!r} repeats a node id")
    return value


def _bound(record: ConfigRecord, key: str, allowed: set[int], stage: str) -> None:
    if not set(_ids(record, key)) <= allowed:
        raise EgressRefused(
            wire.STAGE_RECORD, f"field {key!r} of a {stage!r} reply names nodes outside the request"
        )


def _same_length(record: ConfigRecord, ids: str, values: str) -> None:
    if len(cast(list[Any], record[ids])) != len(cast(list[Any], record[values])):
        raise EgressRefused(wire.STAGE_RECORD, f"fields {ids!r} and {values!r} differ in length")


def _secagg_check(stage: str, request: ConfigRecord) -> RecordCheck:
    """Return the check of a ``secagg`` reply record to ``stage``, bound to the request.

    Field names, types and byte lengths are ``common.secagg.schema.REPLY_FIELDS``; node
    ids must be distinct and among those the request named (so their number is
    bounded by the request): share-keys ``dst`` among ``nodes``; masked-input
    ``active`` and ``rejected`` among ``src``; unmask ``seed-nodes`` among
    ``survivors`` and ``key-nodes`` among ``dropped``.
    """
    # Node ids each list field may name, from the request (parsing checks the request).
    bounds: dict[str, set[int]] = {}
    if stage == SHARE_KEYS:
        bounds["dst"] = set(ShareKeysRequest.parse(request).nodes)
    elif stage == MASKED_INPUT:
        senders = set(Ciphertexts.parse(request, "src").peers)
        bounds |= {"active": senders, "rejected": senders}
    elif stage == UNMASK:
        unmask = UnmaskRequest.parse(request)
        bounds |= {"seed-nodes": set(unmask.survivors), "key-nodes": set(unmask.dropped)}

    def check(record: Any) -> None:
        problem = check_reply_record(record, {})
        if problem is not None:
            raise EgressRefused(wire.STAGE_RECORD, f"secagg record: {problem}")
        if record["stage"] != stage:
            raise EgressRefused(
                wire.STAGE_RECORD, f"secagg record of another stage in a reply to {stage!r}"
            )
        for key, allowed in bounds.items():
            _bound(record, key, allowed, stage)
        if stage == SHARE_KEYS:
            _same_length(record, "dst", "ciphertexts")
        elif stage == MASKED_INPUT:
            if set(_ids(record, "active")) & set(_ids(record, "rejected")):
                raise EgressRefused(wire.STAGE_RECORD, "a peer is both 'active' and 'rejected'")
        elif stage == UNMASK:
            _same_length(record, "seed-nodes", "seed-shares")
            _same_length(record, "key-nodes", "key-shares")

    return check


#: The protocol records a reply may carry, and the builder of each one's check from
#: ``(the message's job, stage, the request's secagg record)``. :func:`reply_schema`
#: puts them into a schema only for the stage or strategy that produces them.
PROTOCOL_RECORDS: dict[str, Callable[[MessageJob, str | None, ConfigRecord | None], RecordCheck]]
PROTOCOL_RECORDS = {
    RECORD: lambda job, stage, req: _secagg_check(str(stage), req or ConfigRecord()),
    MASKED_RECORD: lambda job, stage, req: _arrays_check(job.masked_spec, MASKED_RECORD),
    SCAFFOLD_DELTA_RECORD: lambda job, stage, req: _arrays_check(
        job.parameter_spec, SCAFFOLD_DELTA_RECORD
    ),
}

#: Records of a train reply per SecAgg+ stage (besides ``metrics`` at advertise-keys).
_STAGE_RECORDS: dict[str, tuple[str, ...]] = {
    ADVERTISE: (RECORD,),
    SHARE_KEYS: (RECORD,),
    MASKED_INPUT: (MASKED_RECORD, RECORD),
    UNMASK: (RECORD,),
}


# ------------------------------------------------------------------------ schema
def _faults_on(run: RunConfig) -> bool:
    return run.faults.dropout > 0 or run.faults.slow_site >= 0 or run.faults.crash_site >= 0


def _job(run_config: Mapping[str, Any] | None, job: MessageJob | None) -> MessageJob:
    if job is not None:
        return job
    if run_config is None:
        raise TypeError("the egress check needs the message's job or its run config")
    return MessageJob(run_config=run_config, node_config={})


def reply_schema(
    *,
    message_type: str,
    request: RecordDict,
    run_config: Mapping[str, Any] | None = None,
    job: MessageJob | None = None,
    allowed_metrics: frozenset[str] | None = None,
) -> ReplySchema:
    """Return the exact schema of a reply to ``request`` (see the module docstring).

    Parameters
    ----------
    message_type : str
        The request's ``metadata.message_type`` (``train`` or ``evaluate``).
    request : RecordDict
        The request's content; only its ``secagg`` ``ConfigRecord`` is read.
    run_config : Mapping, optional
        The run config (model, task, classes, strategy, DP, SecAgg+, faults); needed
        only without ``job``.
    job : MessageJob, optional
        The message's job (client/site/job.py): its run config and model specs.
    allowed_metrics : frozenset[str] or None
        The site policy's further restriction of metric names; None for none.

    Raises
    ------
    EgressRefused
        ``message-type`` for a type without a schema; ``stage-record`` for a train
        reply in a SecAgg+ run to a request without a stage; code ``SECAGG`` with
        ``stage-record`` if the request's secagg record is malformed.
    ConfigError, ModelError
        For an invalid run config.
    """
    job = _job(run_config, job)
    run = job.run
    if message_type == MessageType.EVALUATE:
        rules = wire.evaluate_metric_rules(
            task=run.task, num_classes=run.num_classes, faults=_faults_on(run)
        )
        checks = {wire.METRICS_RECORD: _metrics_check(rules, allowed_metrics)}
        if secure_sum.SCORE_HISTOGRAM in secure_sum.spec(run) and not run.secagg.enabled:
            checks[secure_sum.RECORD] = _secure_sum_check(run, only=secure_sum.SCORE_HISTOGRAM)
        return ReplySchema(checks, frozenset({wire.METRICS_RECORD}))
    if message_type != MessageType.TRAIN:
        raise EgressRefused(wire.MESSAGE_TYPE, "no reply schema for this message type")
    validation = (run.task, run.num_classes) if run.evaluation.in_train else None
    train_metrics = _metrics_check(
        wire.train_metric_rules(dp=run.dp.enabled, faults=_faults_on(run), validation=validation),
        allowed_metrics,
    )
    try:
        stage = stage_of(request)
        secagg_request = request.config_records.get(RECORD)
        if stage is None:
            if run.secagg.enabled:
                raise EgressRefused(
                    wire.STAGE_RECORD,
                    "a train reply without a secure-aggregation stage in a run with "
                    "secagg.enabled: the plaintext update may not leave",
                )
            checks = {
                wire.MODEL_RECORD: _arrays_check(job.model_spec, wire.MODEL_RECORD),
                wire.METRICS_RECORD: train_metrics,
            }
            if run.strategy.name == "scaffold":
                checks[SCAFFOLD_DELTA_RECORD] = PROTOCOL_RECORDS[SCAFFOLD_DELTA_RECORD](
                    job, None, None
                )
            if secure_sum.spec(run):
                checks[secure_sum.RECORD] = _secure_sum_check(run)
            return ReplySchema(checks, frozenset({wire.MODEL_RECORD, wire.METRICS_RECORD}))
        checks = {
            name: PROTOCOL_RECORDS[name](job, stage, secagg_request)
            for name in _STAGE_RECORDS[stage]
        }
    except SecAggError as exc:
        raise EgressRefused(
            wire.STAGE_RECORD,
            f"the request's secagg record is unusable: {exc}",
            code=ReplyCode.SECAGG,
        ) from exc
    if stage == ADVERTISE:
        checks[wire.METRICS_RECORD] = train_metrics
    return ReplySchema(checks, frozenset(checks))


def check_reply(
    *,
    message_type: str,
    request: RecordDict,
    reply: RecordDict,
    run_config: Mapping[str, Any] | None = None,
    job: MessageJob | None = None,
    allowed_metrics: frozenset[str] | None = None,
) -> None:
    """Check that ``reply`` is exactly what may leave the site in answer to ``request``.

    Parameters
    ----------
    message_type : str
        The request's ``metadata.message_type``.
    request : RecordDict
        The request's content as the coordinator sent it (its ``secagg`` record names
        the stage). Pass a copy taken before any handler could change it.
    reply : RecordDict
        The reply's content.
    run_config : Mapping, optional
        The run config; needed only without ``job``.
    job : MessageJob, optional
        The message's job (client/site/job.py), as the site service passes it.
    allowed_metrics : frozenset[str] or None
        The site policy's allowed metric names (a further restriction); None for none.

    Raises
    ------
    EgressRefused
        With ``.code`` (``EGRESS``, or ``SECAGG`` for an unusable request stage) and
        ``.detail`` (``metric-name``, ``metric-value``, ``metric-missing``,
        ``record-name``, ``record-type``, ``record-missing``, ``array-spec``,
        ``stage-record``, ``message-type``; :data:`common.wire.DETAILS`).
    ConfigError, ModelError
        For an invalid run config (the guard then refuses with ``INTERNAL``).
    """
    schema = reply_schema(
        message_type=message_type,
        request=request,
        run_config=run_config,
        job=job,
        allowed_metrics=allowed_metrics,
    )
    schema.check(reply)


# ---------------------------------------------------------------- error replies
def _is_fixed(code: int, reason: str) -> bool:
    """Whether ``reason`` is ``fixed_reason(code)`` or ``fixed_reason(code, detail)``."""
    return parse_reason(code, reason) is not None


def _is_simulated_fault(error: Error, context: Context) -> bool:
    """Return True for a virtual site's injected dropout (client/faults.py, fixed text)."""
    from client.faults import REASON_DROPOUT

    return (
        "partition-id" in context.node_config
        and error.code == ErrorCode.NODE_UNAVAILABLE
        and error.reason == REASON_DROPOUT
    )


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=int(code), reason=reason), reply_to=msg)


def vetted_error(msg: Message, reply: Message, context: Context) -> Message:
    """Return ``reply`` (an error reply) if its reason is fixed, else an ``INTERNAL`` one.

    An inner error reply passes only if its code is a :class:`ReplyCode` and its reason
    is that code's :func:`fixed_reason` (with or without a vocabulary detail), or if it
    is a virtual site's injected dropout; otherwise its reason (which may hold a path or
    a value) is logged at the site and replaced.
    """
    error = reply.error
    if _is_fixed(error.code, error.reason or "") or _is_simulated_fault(error, context):
        return reply
    log.warning(
        "%s: replacing an error reply (code %s) by %s; its reason stays here: %s",
        REASON_PREFIX,
        error.code,
        ReplyCode.INTERNAL.name,
        error.reason,
    )
    return _error_reply(msg, ReplyCode.INTERNAL, fixed_reason(ReplyCode.INTERNAL))


# ----------------------------------------------------------------------- the mod
def _request_view(msg: Message) -> RecordDict:
    """Copy of what the schema reads from the request (its ``secagg`` record).

    Taken before the inner call, so a handler that rewrites the request cannot change
    the schema its reply is checked against.
    """
    if not msg.has_content() or RECORD not in msg.content.config_records:
        return RecordDict()
    return RecordDict({RECORD: copy.deepcopy(msg.content.config_records[RECORD])})


def egress_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: run the inner call, let out only a reply that fits its schema.

    Parameters
    ----------
    msg : Message
        The incoming instruction.
    context : Context
        Flower's context (``run_config`` gives the schema; ``node_config`` tells a
        virtual site of a simulation by its ``partition-id``).
    call_next : ClientAppCallable
        The next mod or the handler.

    Returns
    -------
    Message
        The inner reply if it passes :func:`check_reply`; otherwise an error reply with
        a :class:`ReplyCode` and its :func:`fixed_reason` only: ``EGRESS`` (+ detail)
        for a refused reply, ``INTERNAL`` for an exception or an inner error reply
        without a fixed reason. A virtual site's injected crash (client/faults.py)
        leaves as Flower's ``CLIENT_APP_RAISED_EXCEPTION`` with the fixed text
        ``client.faults.REASON_CRASH``.
    """
    message_type = msg.metadata.message_type
    try:
        request = _request_view(msg)
        reply = call_next(msg, context)
        if not isinstance(reply, Message):
            raise TypeError(f"the inner call returned a {type(reply).__name__}, not a Message")
    except Exception as exc:
        from client.faults import REASON_CRASH, InjectedFault

        if isinstance(exc, InjectedFault) and "partition-id" in context.node_config:
            log.warning("%s: injected crash of a virtual site", REASON_PREFIX)
            return _error_reply(msg, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, REASON_CRASH)
        log.exception("%s: the %s handler raised", REASON_PREFIX, message_type)
        return _error_reply(msg, ReplyCode.INTERNAL, fixed_reason(ReplyCode.INTERNAL))
    try:
        if reply.has_error():
            return vetted_error(msg, reply, context)
        check_reply(
            message_type=message_type,
            request=request,
            reply=reply.content,
            job=job_of(context),
        )
    except EgressRefused as exc:
        log.error("%s to a %s message (%s): %s", REASON_PREFIX, message_type, exc.detail, exc)
        return _error_reply(msg, exc.code, exc.reason)
    except Exception:  # a guard that cannot decide refuses
        log.exception("%s: the check of a %s reply failed", REASON_PREFIX, message_type)
        return _error_reply(msg, ReplyCode.INTERNAL, fixed_reason(ReplyCode.INTERNAL))
    return reply
