"""The egress guard: a Flower client mod that checks every reply before it leaves the site.

Installed in front of the ClientApp (``ClientApp(mods=[egress_guard])``, Flower 1.41 mod
signature ``(Message, Context, ClientAppCallable) -> Message``, see
``flwr/clientapp/typing.py``). It lets a reply through only if every record in it is
allowed by :mod:`common.wire`:

* ``ArrayRecord`` ``arrays``: exactly the ``state_dict`` names, shapes and dtypes of the
  model named by the run config (``common.models.get_model`` +
  ``common.records.expected_spec``), no extra payload bytes;
* ``MetricRecord`` s: allow-listed keys only, numeric scalars only (no lists);
* records registered in ``common.wire.EXTRA_RECORDS`` (secure aggregation), checked by
  their own check;
* nothing else (no ``ConfigRecord``: it can carry strings and bytes).

Anything else is replaced by an error reply (``ErrorCode.MOD_FAILED_PRECONDITION``) and a
site-side log line that names the offending record and key, never its value. Error
replies from the handler pass unchanged (they carry only Flower's error reason).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import (
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
from flwr.common.constant import ErrorCode

from common import wire
from common.config import RunConfig
from common.models import get_model
from common.records import expected_spec

log = logging.getLogger(__name__)

REASON_PREFIX = "egress guard refused the reply"


def model_spec(run_config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of the model the run config trains.

    Raises
    ------
    ConfigError, ModelError
        For an invalid run config or unknown model.

    """
    run = RunConfig.from_run_config(run_config)
    return expected_spec(get_model(run.model, **run.model_kwargs()))


def check_content(
    content: RecordDict, run_config: Mapping[str, Any], *, plaintext_model: bool = True
) -> str | None:
    """Return the first reason ``content`` may not leave the site, or ``None``.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    run_config : Mapping
        The run config (names the model).
    plaintext_model : bool
        Whether the plaintext model record may leave. False for training replies when
        secure aggregation is on: then only the masked vector may carry the update.

    Returns
    -------
    str or None
        The reason, naming the record and key, never a value.
    """
    for name, record in content.items():
        if name in wire.EXTRA_RECORDS:
            problem = wire.EXTRA_RECORDS[name](record, run_config)
            if problem:
                return f"record {name!r}: {problem}"
            continue
        if isinstance(record, ArrayRecord):
            if name != wire.MODEL_RECORD:
                return f"array record {name!r} is not the model update ({wire.MODEL_RECORD!r})"
            if not plaintext_model:
                return (
                    f"record {name!r}: plaintext model update while secure aggregation is on "
                    "(only the masked vector may leave)"
                )
            problem = wire.check_arrays(record, model_spec(run_config))
            if problem:
                return f"record {name!r}: {problem}"
        elif isinstance(record, MetricRecord):
            for key, value in record.items():
                if not wire.metric_allowed(key):
                    return f"metric {key!r} in record {name!r} is not allow-listed"
                if isinstance(value, bool) or not isinstance(value, int | float):
                    return f"metric {key!r} in record {name!r} is not a numeric scalar"
        elif isinstance(record, ConfigRecord):
            keys = sorted(record.keys())
            first = f" (first key {keys[0]!r})" if keys else ""
            return f"config record {name!r}{first} may carry strings or bytes; not allowed"
        else:
            return f"record {name!r} of type {type(record).__name__} is not allowed"
    return None


def egress_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: run the handler, then refuse any reply with disallowed content.

    Parameters
    ----------
    msg : Message
        The incoming instruction.
    context : Context
        Flower's context (``run_config`` names the model).
    call_next : ClientAppCallable
        The next mod or the handler.

    Returns
    -------
    Message
        The handler's reply if it passes, otherwise an error reply whose reason names the
        offending record/key.

    """
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        secagg = RunConfig.from_run_config(context.run_config).secagg_enabled
        is_train = msg.metadata.message_type == MessageType.TRAIN
        problem = check_content(
            reply.content, context.run_config, plaintext_model=not (secagg and is_train)
        )
    except Exception as exc:  # a guard that cannot decide must refuse
        problem = f"could not check the reply ({type(exc).__name__})"
    if problem is None:
        return reply
    log.error("%s to %s message: %s", REASON_PREFIX, msg.metadata.message_type, problem)
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{REASON_PREFIX}: {problem}"),
        reply_to=msg,
    )
