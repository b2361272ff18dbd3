"""The site service: every message a coordinator sends, checked, handled and audited.

One code path for both engines (DESIGN section 1): the site worker (``medfed site
serve``, client/site/worker.py) calls :meth:`SiteService.handle` for each message the
relay ClientApp forwards; in simulation the ClientApp calls it in-process. For every
message, in this order:

1. **Request schema.** Only the message types and records of the site API (``train``,
   ``evaluate``; records ``arrays``, ``config``, ``secagg``, ``scaffold-c``) are
   accepted; anything else is refused before the run config is even read.
2. **Policy.** The run config is parsed and checked against the site policy
   (client/site/policy.py): DP and SecAgg+ required, noise floor, clipping bounds,
   models, tasks, projects, rounds, local epochs, evaluation limits, the number of sites
   in a secure aggregate. A request outside it is refused before any work, with an
   error reply naming the rule.
3. **Work.** SecAgg+ (client/secagg_mod.py) around the train/evaluate handlers
   (client/site/handlers.py). The site worker mounts nothing else; only the simulation
   mounts more mods (its fault injection, client/site/simulated.py) via
   :class:`SiteMods`.
4. **Egress.** The reply is checked against the exact schema of its message type and
   stage (client/egress.py) and the policy's allowed metrics; error replies carry only a
   :class:`~common.replies.ReplyCode` and its fixed reason.
5. **Audit.** The request, the decision, the epsilon spent and the bytes and keys that
   left are appended to the site's hash-chained audit log (client/site/audit.py).

Each message is resolved once (client/site/job.py): the run config parsed, the model
built, the state dir and ledger key found, by whichever step needs them first; every
later step, mods and handlers included, reads the same :class:`MessageJob` from the
:class:`JobContext` the service passes down.

Nothing in this module trusts the run config: it is the coordinator's.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from client.egress import EgressRefused, check_reply
from client.replies import error_message
from client.secagg_mod import ERROR_CODE as SECAGG_ERROR_CODE
from client.secagg_mod import secagg_mod
from client.site.audit import AuditLog
from client.site.handlers import Job, error_reply, make_handler
from client.site.job import JobContext, MessageJob
from client.site.policy import PolicyRefusal, SitePolicy
from common.errors import ConfigError, MedfedError
from common.replies import ReplyCode, is_site_refusal, parse_reason
from common.secagg.errors import SecAggError
from common.secagg.params import RECORD as SECAGG_RECORD
from common.secagg.params import SHARE_KEYS
from common.secagg.schema import ShareKeysRequest, stage_of

log = logging.getLogger(__name__)

#: Version of the site API (the worker's gRPC service name carries it too).
API_VERSION = 1

#: Request records of the site API, by name: the type each must have.
REQUEST_RECORDS: dict[str, type] = {
    "arrays": ArrayRecord,
    "config": ConfigRecord,
    SECAGG_RECORD: ConfigRecord,
    "scaffold-c": ArrayRecord,
}

#: Message types of the site API.
MESSAGE_TYPES = (MessageType.TRAIN, MessageType.EVALUATE)

Handler = Callable[[Message, Context], Message]
#: A Flower client mod: ``(msg, context, call_next) -> reply`` (flwr/clientapp/typing.py).
Mod = Callable[[Message, Context, Handler], Message]


@dataclass(frozen=True)
class SiteMods:
    """Mods a caller mounts in the site service's chain besides SecAgg+.

    Only a simulation mounts any (its fault injection, client/site/simulated.py); the
    site worker (``medfed site serve``) mounts none, and :class:`SiteService` refuses
    mods for a site that is not simulated.

    Attributes
    ----------
    outer : tuple of Mod
        Outside the SecAgg+ mod, outermost first: they see every SecAgg+ stage.
    inner : tuple of Mod
        Inside the SecAgg+ mod, outermost first, around the train/evaluate handler.
    crashes : tuple of exception types
        What these mods raise on purpose to fail like a crashed site:
        :meth:`SiteService.handle` audits it (``injected-crash``) and lets it out, so
        Flower sees the ClientApp fail. Any other exception becomes an error reply.
    """

    outer: tuple[Mod, ...] = ()
    inner: tuple[Mod, ...] = ()
    crashes: tuple[type[Exception], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.outer or self.inner or self.crashes)


def _mounted(mod: Mod, call_next: Handler) -> Handler:
    def call(msg: Message, context: Context) -> Message:
        return mod(msg, context, call_next)

    return call


class RequestRefusedError(MedfedError, PermissionError):
    """A message outside the site API; ``detail`` names what (a vocabulary name)."""

    def __init__(self, message: str, *, code: ReplyCode, detail: str) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail


def check_request(msg: Message) -> str | None:
    """Check a message against the site API before anything reads it.

    Returns
    -------
    str or None
        The SecAgg+ stage the message asks for, or None for a plain message.

    Raises
    ------
    RequestRefusedError
        For another message type, an error message, an unknown record or a record of the
        wrong type.
    """
    if msg.metadata.message_type not in MESSAGE_TYPES:
        raise RequestRefusedError(
            f"message type {msg.metadata.message_type!r} is not part of the site API",
            code=ReplyCode.BAD_REQUEST,
            detail="message-type",
        )
    if not msg.has_content():
        raise RequestRefusedError(
            "a request without content", code=ReplyCode.BAD_REQUEST, detail="content"
        )
    for name, record in msg.content.items():
        expected = REQUEST_RECORDS.get(name)
        if expected is None or not isinstance(record, expected):
            raise RequestRefusedError(
                f"request record {name!r} is not part of the site API",
                code=ReplyCode.BAD_REQUEST,
                detail="record-name",
            )
    try:
        stage = stage_of(msg.content)
    except SecAggError as exc:
        raise RequestRefusedError(str(exc), code=ReplyCode.SECAGG, detail="stage") from exc
    if stage is not None and msg.metadata.message_type != MessageType.TRAIN:
        raise RequestRefusedError(
            "secure aggregation runs on train messages only",
            code=ReplyCode.BAD_REQUEST,
            detail="stage",
        )
    return stage


@dataclass(frozen=True)
class _Outcome:
    reply: Message
    code: ReplyCode | None
    detail: str


class SiteService:
    """The site's request pipeline: schema, policy, work, egress, audit.

    Parameters
    ----------
    policy : SitePolicy
        The hospital's policy; every request is checked against it before any work.
    simulated : bool
        True only for a virtual site of a simulation (in-process): allows
        ``dp.reproducible-noise`` and ``mods``. A worker started by ``medfed site
        serve`` is never simulated.
    mods : SiteMods
        Simulation only: further mods around SecAgg+ and the handlers (the fault
        injection of client/site/simulated.py); none by default.

    Raises
    ------
    ValueError
        If ``mods`` are given for a site that is not simulated.

    Notes
    -----
    The service keeps no state of its own between messages: SecAgg+ round secrets live
    in the ``Context.state`` the caller passes (the worker keeps one per run in memory;
    Flower's simulation engine keeps it per virtual node); the privacy ledger and the
    audit log live in the site's state dir.
    """

    def __init__(self, *, policy: SitePolicy, simulated: bool, mods: SiteMods = SiteMods()) -> None:
        if mods and not simulated:
            raise ValueError(
                "SiteService(mods=...) is for virtual sites of a simulation only: a site "
                "worker runs SecAgg+ and the handlers and nothing else (pass simulated=True)"
            )
        self.policy = policy
        self.simulated = simulated
        self._crashes = mods.crashes
        chain: Handler = make_handler(policy, may_evaluate=self._may_evaluate_in_train)
        for mod in (*mods.outer, secagg_mod, *mods.inner)[::-1]:
            chain = _mounted(mod, chain)
        self._chain = chain

    def describe(self) -> dict[str, Any]:
        """Return what the site tells a relay about itself: API version and policy digest."""
        return {"api-version": API_VERSION, "policy-digest": self.policy.digest()}

    # ------------------------------------------------------------------ handling
    def handle(self, msg: Message, context: Context) -> Message:
        """Check, handle, check again and audit one message from the coordinator.

        Parameters
        ----------
        msg : flwr.app.Message
            The coordinator's message, as the relay (or Flower's simulation) delivered it.
        context : flwr.app.Context
            ``node_config`` is the site's own (never the coordinator's), ``run_config``
            the coordinator's, ``state`` the per-run state the caller keeps.

        Returns
        -------
        flwr.app.Message
            Exactly what may leave the site: the checked reply, or an error reply with a
            :class:`~common.replies.ReplyCode` and its fixed reason.

        Raises
        ------
        Exception
            Simulation only: one of the mounted mods' ``crashes`` (the injected crash of
            ``faults.crash-site``; Flower must see the ClientApp fail).
        """
        job = MessageJob.of(context)  # this message's config, model, state dir: once
        audit = self._audit(job)
        fields = _request_fields(msg, context)
        if audit is not None:
            audit.append("request", **fields)
        try:
            outcome = self._handle(msg, JobContext(context, job), audit)
        except self._crashes:
            if audit is not None:
                audit.append("refusal", **_run_fields(fields), code="injected-crash", detail="")
            raise
        if audit is not None:
            if outcome.code is None:
                audit.append("reply", **_run_fields(fields), **_reply_fields(outcome.reply))
            else:
                audit.append(
                    "refusal",
                    **_run_fields(fields),
                    code=outcome.code.name.lower().replace("_", "-"),
                    detail=outcome.detail,
                )
        return outcome.reply

    def _audit(self, job: MessageJob) -> AuditLog | None:
        """Return the site's audit log (its state dir), or None if the state dir is unknown.

        A site's own ``state-dir`` (node config) is used without parsing the
        coordinator's run config, so a request with an invalid run config (refused in
        :meth:`_handle`) is still audited; only a virtual site needs the run config.
        """
        try:
            node = job.node
            if node.state_dir is not None:
                return AuditLog(node.state_dir)
            state_dir = job.state_dir
        except ConfigError:
            return None
        return AuditLog(state_dir)

    def _handle(self, msg: Message, context: JobContext, audit: AuditLog | None) -> _Outcome:
        job = context.job
        try:
            stage = check_request(msg)
            run = job.run
            self.policy.check_run(
                run, message_type=msg.metadata.message_type, simulated=self.simulated
            )
            if msg.metadata.message_type == MessageType.EVALUATE:
                self._check_evaluation(job, audit, context.run_id)
            if stage == SHARE_KEYS:
                request = ShareKeysRequest.parse(msg.content.config_records[SECAGG_RECORD])
                self.policy.check_secagg_sites(len(request.nodes))
        except RequestRefusedError as exc:
            log.warning("refusing a message outside the site API: %s", exc)
            return self._refuse(msg, exc.code, exc.detail)
        except PolicyRefusal as exc:
            log.warning("site policy refuses the request: %s", exc)
            return self._refuse(msg, ReplyCode.POLICY, exc.rule)
        except SecAggError as exc:
            log.warning("secure aggregation refused a message: %s", exc)
            return self._refuse(msg, ReplyCode.SECAGG, "request")
        except ConfigError as exc:
            log.warning("refusing a message with a bad run config: %s", exc)
            return self._refuse(msg, ReplyCode.BAD_REQUEST, "run-config")
        # The egress schema follows the request's secagg record as the coordinator sent
        # it: a copy taken before any mod or handler could change the message.
        as_sent = _config_snapshot(msg.content)
        try:
            reply = self._chain(msg, context)
        except self._crashes:
            raise
        except Exception as exc:  # the reply never carries exception text
            reply = error_reply(msg, exc)
        return self._egress(msg, reply, job, stage, request=as_sent)

    def _check_evaluation(self, job: MessageJob, audit: AuditLog | None, run_id: int) -> None:
        """Apply the policy's evaluation limits (count per run, minimum images)."""
        data = job.dataset
        num_images = data.count("val") if "val" in data.splits else 0
        self.policy.check_evaluation(
            evaluations_so_far=_evaluations(audit, run_id), num_images=num_images
        )

    def _may_evaluate_in_train(self, job: Job) -> bool:
        """Return whether the policy's evaluation limits allow a folded validation now."""
        audit = AuditLog(job.state_dir)
        try:
            self.policy.check_evaluation(
                evaluations_so_far=_evaluations(audit, job.run_id),
                num_images=job.data.count("val"),
            )
        except PolicyRefusal as exc:
            log.warning("no validation in this train reply: %s", exc)
            return False
        return True

    def _egress(
        self,
        msg: Message,
        reply: Message,
        job: MessageJob,
        stage: str | None,
        *,
        request: RecordDict,
    ) -> _Outcome:
        """Let the reply leave only if it is exactly what its message type may carry.

        ``request`` is :func:`_config_snapshot` of the request, taken before the mods ran.
        """
        if reply.has_error():
            return self._sanitised_error(msg, reply, stage)
        try:
            check_reply(
                message_type=msg.metadata.message_type,
                request=request,
                reply=reply.content,
                job=job,
                allowed_metrics=self.policy.allowed_metric_names(),
            )
        except EgressRefused as exc:
            log.error(
                "egress rules refuse the reply to a %s message: %s", msg.metadata.message_type, exc
            )
            return self._refuse(msg, exc.code, exc.detail)
        except Exception:  # a guard that cannot decide refuses
            log.exception("egress check failed")
            return self._refuse(msg, ReplyCode.EGRESS, "check-failed")
        return _Outcome(reply, None, "")

    def _sanitised_error(self, msg: Message, reply: Message, stage: str | None) -> _Outcome:
        """Map an inner error reply to a medfed code with its fixed reason."""
        code, reason = reply.error.code, reply.error.reason or ""
        if code == SECAGG_ERROR_CODE:
            return self._refuse(msg, ReplyCode.SECAGG, stage or "")
        if self.simulated and code == ErrorCode.NODE_UNAVAILABLE:
            return _Outcome(reply, ReplyCode.WORKER_UNAVAILABLE, "injected-dropout")
        detail = parse_reason(code, reason)
        if detail is not None:
            return _Outcome(reply, ReplyCode(code), detail)
        if is_site_refusal(code):  # a medfed code with free text: keep the code only
            return self._refuse(msg, ReplyCode(code), "")
        return self._refuse(msg, ReplyCode.INTERNAL, "")

    @staticmethod
    def _refuse(msg: Message, code: ReplyCode, detail: str) -> _Outcome:
        try:
            reply = error_message(msg, code, detail)
        except ValueError:
            detail, reply = "", error_message(msg, code)
        return _Outcome(reply, code, detail)


def _evaluations(audit: AuditLog | None, run_id: int) -> int:
    """Count the replies of run ``run_id`` that carried validation metrics.

    Counts evaluate replies and train replies with ``evaluate-in-train`` alike: each
    evaluated a model the coordinator chose on the site's validation images.
    """
    if audit is None:
        return 0
    return sum(
        1
        for e in audit.entries()
        if e.get("event") == "reply"
        and e.get("run-id") == run_id
        and any(str(k).startswith("val-") for k in e.get("records", {}).get("metrics", []))
    )


def _config_snapshot(content: RecordDict) -> RecordDict:
    """Return a copy of ``content``'s config records (all the egress schema reads)."""
    return RecordDict({k: ConfigRecord(dict(v)) for k, v in content.config_records.items()})


def _request_fields(msg: Message, context: Context) -> dict[str, Any]:
    """Audit fields of a request: ids, type, stage and the run's headline settings."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    server_round = config.get("server-round") if config is not None else None
    stage = None
    if msg.has_content() and SECAGG_RECORD in msg.content.config_records:
        secagg = msg.content.config_records[SECAGG_RECORD]
        raw = secagg.get("stage")
        stage = raw if isinstance(raw, str) and len(raw) <= 32 else "invalid"
        if server_round is None:  # later SecAgg+ stages carry the round in their header
            server_round = secagg.get("round")
    rc = context.run_config
    return {
        "run-id": int(context.run_id),
        "round": server_round if isinstance(server_round, int) else None,
        "message-type": str(msg.metadata.message_type)[:32],
        "stage": stage,
        "model": _name(rc.get("model", "")),
        "project": _name(rc.get("project", "")),
        "dp": rc.get("dp.enabled"),
        "secagg": rc.get("secagg.enabled"),
        "bytes-in": _nbytes(msg.content) if msg.has_content() else 0,
    }


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _name(value: object) -> str:
    """Return a coordinator-chosen name as the audit log records it.

    A plain name as is, anything else as ``sha256:<16 hex>``: free text from the
    coordinator is never written verbatim.
    """
    text = str(value)
    if _NAME.match(text):
        return text
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _run_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: fields[k] for k in ("run-id", "round", "message-type", "stage")}


def _reply_fields(reply: Message) -> dict[str, Any]:
    """Audit fields of a reply that left: its records and keys, bytes, epsilon."""
    content = reply.content
    records: dict[str, list[str]] = {}
    for name, record in content.items():
        records[name] = sorted(str(k) for k in record)
    epsilon = None
    metrics = content.metric_records.get("metrics")
    if metrics is not None and isinstance(metrics.get("epsilon"), int | float):
        epsilon = float(metrics["epsilon"])  # type: ignore[arg-type]
    return {"records": records, "bytes-out": _nbytes(content), "epsilon": epsilon}


def _nbytes(content: RecordDict) -> int:
    """Payload bytes of a record dict (arrays' data; config values' lengths)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        else:
            for value in record.values():
                total += len(value) if isinstance(value, bytes | str | list) else 8
    return total
