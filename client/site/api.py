"""The site worker's local API (version 1): names and message (de)serialisation.

The relay ClientApp (client/app.py) and the site worker (client/site/worker.py) speak
gRPC over a Unix domain socket, with grpcio's local credentials
(``grpc.local_server_credentials(grpc.LocalConnectionType.UDS)``). Each method is unary:
the request and the reply are Flower ``Message`` protobufs (``flwr.proto.message_pb2``,
converted with ``flwr.common.serde``), so no framing of our own is involved.

Methods of ``medfed.site.v1.SiteWorker``:

``Describe``
    Empty request; the reply's ``describe`` ConfigRecord holds the API version and the
    digest of the site policy.
``Train`` / ``Evaluate``
    The coordinator's message as the SuperNode delivered it, plus one ConfigRecord
    :data:`RUN_CONFIG_RECORD` with the run config (the coordinator's, like the rest of
    the message). The reply is exactly what may leave the site.

Anything else (another method, a record outside the API) is refused by the worker.
This module imports neither torch nor any site code: the relay uses it.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import serde
from flwr.proto.message_pb2 import Message as ProtoMessage

API_VERSION = 1
SERVICE = f"medfed.site.v{API_VERSION}.SiteWorker"
DESCRIBE, TRAIN, EVALUATE = "Describe", "Train", "Evaluate"
METHODS = (DESCRIBE, TRAIN, EVALUATE)
#: Record the relay adds to carry the run config to the worker.
RUN_CONFIG_RECORD = "medfed.run-config"
#: Largest request or reply on the socket (bytes): a U-Net update is a few MB.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
#: grpc channel/server options for both ends.
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def method_path(method: str) -> str:
    """Return the gRPC path of a method, e.g. ``/medfed.site.v1.SiteWorker/Train``."""
    return f"/{SERVICE}/{method}"


def encode_request(msg: Message, run_config: Mapping[str, object]) -> bytes:
    """Serialise a coordinator message and its run config for the worker."""
    content = RecordDict(dict(msg.content.items())) if msg.has_content() else RecordDict()
    content[RUN_CONFIG_RECORD] = ConfigRecord(dict(run_config))  # type: ignore[arg-type]
    proto = serde.message_to_proto(msg)
    proto.content.CopyFrom(serde.recorddict_to_proto(content))
    return bytes(proto.SerializeToString())


def decode_message(data: bytes) -> Message:
    """Parse a serialised Flower message (request or reply)."""
    return serde.message_from_proto(ProtoMessage.FromString(data))


def encode_message(msg: Message) -> bytes:
    """Serialise a Flower message (a reply)."""
    return bytes(serde.message_to_proto(msg).SerializeToString())
