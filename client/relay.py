"""The relay: the deployment ClientApp's only job is to pass messages to the site worker.

The FAB's ClientApp is the coordinator's code, so in deployment it is given nothing of
value: no dataset, no state dir, no keys (DESIGN section 1, "Trust boundary"). It reads
the worker's socket from node config ``site-worker`` (set by the hospital on its
SuperNode), forwards the message and the run config (client/site/api.py), and returns
the worker's reply content or error, and nothing else. It imports neither torch nor any
site code, so a message costs no training-stack import here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
from flwr.app import Error, Message, MessageType

from client.replies import error_message
from client.site import api
from common.replies import ReplyCode

log = logging.getLogger(__name__)

#: Node config key naming the site worker's Unix socket.
WORKER_KEY = "site-worker"
#: Seconds a relayed request may take (training a round included).
DEFAULT_TIMEOUT = 3600.0


def _timeout(run_config: Mapping[str, object]) -> float:
    value = run_config.get("round-timeout")
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value) + 60.0
    return DEFAULT_TIMEOUT


def call_worker(socket: str, method: str, request: bytes, *, timeout: float) -> bytes:
    """Call one method of the site API on the worker's socket.

    Raises
    ------
    grpc.RpcError
        If the worker is unreachable, refuses the call or exceeds ``timeout`` seconds.
    """
    with grpc.secure_channel(
        f"unix:{socket}",
        grpc.local_channel_credentials(grpc.LocalConnectionType.UDS),
        options=list(api.GRPC_OPTIONS),
    ) as channel:
        stub: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            api.method_path(method)
        )
        return bytes(stub(request, timeout=timeout))


def relay(msg: Message, run_config: Mapping[str, object], *, socket: str) -> Message:
    """Forward ``msg`` to the site worker and return its reply (content or error only).

    Returns
    -------
    flwr.app.Message
        A reply to ``msg`` carrying the worker's content or error; an error reply with
        :attr:`~common.replies.ReplyCode.WORKER_UNAVAILABLE` when the worker cannot be
        reached.
    """
    methods = {MessageType.TRAIN: api.TRAIN, MessageType.EVALUATE: api.EVALUATE}
    method = methods.get(msg.metadata.message_type)
    if method is None:
        return error_message(msg, ReplyCode.BAD_REQUEST, "message-type")
    try:
        data = call_worker(
            socket, method, api.encode_request(msg, run_config), timeout=_timeout(run_config)
        )
        reply = api.decode_message(data)
    except grpc.RpcError as exc:
        status = exc.code() if isinstance(exc, grpc.Call) else None
        log.error("site worker at %s: %s", socket, status)
        if status == grpc.StatusCode.INVALID_ARGUMENT:
            return error_message(msg, ReplyCode.BAD_REQUEST, "decode")
        return error_message(msg, ReplyCode.WORKER_UNAVAILABLE)
    if reply.has_error():
        return Message(Error(code=reply.error.code, reason=reply.error.reason), reply_to=msg)
    return Message(reply.content, reply_to=msg)
