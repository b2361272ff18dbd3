"""The site worker: a long-lived process, installed by the hospital, serving the site API.

``medfed site serve --policy site-policy.toml --dataset-dir DIR --state-dir DIR
--socket PATH`` starts it. It alone reads the site dataset and holds the model code,
Opacus, the privacy ledger, the SecAgg+ round secrets, the site policy, the egress rules
and the audit log; the ClientApp that arrives in the coordinator's FAB only relays
messages to it over a Unix socket (client/site/api.py) and returns what it answers.

Torch, Opacus and the dataset stay loaded between messages, so a round no longer pays
their import per message. One request is handled at a time (a site trains one model at
a time; the privacy ledger is also locked across processes). SecAgg+ round state is kept
per run in memory, in a Flower ``Context`` whose ``node_config`` is the worker's own
configuration: the coordinator can name neither the dataset nor the state dir.
"""

from __future__ import annotations

import logging
import os
import signal
import socket as socketlib
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.replies import error_message
from client.site import api
from client.site.audit import AuditLog
from client.site.policy import SitePolicy
from client.site.service import SiteService
from common.errors import ConfigError, MedfedError
from common.fsutil import private_mkdir
from common.replies import ReplyCode, fixed_reason
from common.site_dataset import SiteDataset

log = logging.getLogger(__name__)

#: Longest Unix socket path (``sun_path`` is 108 bytes on Linux, NUL included).
MAX_SOCKET_PATH = 107
#: Runs whose SecAgg+ state the worker keeps in memory (oldest dropped first).
MAX_RUNS = 16


@dataclass(frozen=True)
class WorkerConfig:
    """What the hospital configures for its worker (never the coordinator).

    Attributes
    ----------
    dataset_dir : Path
        The site dataset (``medfed ingest`` output), read-only for the worker.
    state_dir : Path
        The worker's own state: privacy ledger, audit log, SCAFFOLD variates.
    socket : Path
        The Unix socket the relay connects to.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    site_id : str
        A name for the site's own logs; never leaves the site.
    socket_mode : int
        Permission bits of the socket: ``0o600`` (relay runs as the same user) or
        ``0o660`` (relay in the socket's group).
    """

    dataset_dir: Path
    state_dir: Path
    socket: Path
    device: str = "auto"
    site_id: str = ""
    socket_mode: int = 0o600

    def node_config(self) -> dict[str, bool | float | int | str]:
        """Return the node config every handler sees (the site's own, not the coordinator's)."""
        return {
            "dataset-dir": str(self.dataset_dir),
            "state-dir": str(self.state_dir),
            "device": self.device,
            "site-id": self.site_id,
        }


class SiteWorker:
    """Hold the site service and the per-run contexts; handle one request at a time.

    Parameters
    ----------
    config : WorkerConfig
        The hospital's configuration.
    policy : SitePolicy
        The hospital's site policy.

    Raises
    ------
    DataError
        If the dataset dir is not a readable site dataset.
    ConfigError
        If the socket mode is not 0o600 or 0o660.
    AuditChainError
        If the state dir's audit log does not verify (the worker refuses to start).
    """

    def __init__(self, config: WorkerConfig, policy: SitePolicy) -> None:
        if config.socket_mode not in (0o600, 0o660):
            raise ConfigError("socket mode must be 600 or 660 (no access for others)")
        SiteDataset(config.dataset_dir)  # fail now, not at round 1
        private_mkdir(config.state_dir)  # 0700 (and missing parents) whatever the umask
        AuditLog(config.state_dir).verify()
        self.config = config
        self.policy = policy
        self.service = SiteService(policy=policy, simulated=False)
        self._contexts: OrderedDict[int, Context] = OrderedDict()
        self._lock = threading.Lock()
        AuditLog(config.state_dir).append(
            "worker-start", api_version=api.API_VERSION, policy_digest=policy.digest()
        )
        # Import the training stack now so the first round does not pay for it.
        import client.site.handlers  # noqa: F401

    def _context(self, run_id: int, run_config: dict[str, Any]) -> Context:
        ctx = self._contexts.get(run_id)
        if ctx is None:
            ctx = Context(
                run_id=run_id,
                node_id=0,
                node_config=self.config.node_config(),
                state=RecordDict(),
                run_config=run_config,
            )
            self._contexts[run_id] = ctx
            while len(self._contexts) > MAX_RUNS:
                self._contexts.popitem(last=False)
        else:
            ctx.run_config = run_config  # the coordinator's, checked by the service
        self._contexts.move_to_end(run_id)
        return ctx

    def handle(self, method: str, data: bytes) -> bytes:
        """Decode a relayed request, run it through the service, encode the reply.

        A request that does not match its method gets a fixed-reason error reply.

        Raises
        ------
        UndecodableRequestError
            If ``data`` is not a Flower message (the server answers INVALID_ARGUMENT).
        """
        try:
            msg = api.decode_message(data)
        except Exception as exc:
            log.warning("refusing an undecodable request on %s", method)
            raise UndecodableRequestError("undecodable request") from exc
        expected = {api.TRAIN: MessageType.TRAIN, api.EVALUATE: MessageType.EVALUATE}
        if expected.get(method) != msg.metadata.message_type or not msg.has_content():
            return api.encode_message(error_message(msg, ReplyCode.BAD_REQUEST, "message-type"))
        record = msg.content.config_records.get(api.RUN_CONFIG_RECORD)
        if record is None:
            return api.encode_message(error_message(msg, ReplyCode.BAD_REQUEST, "run-config"))
        run_config = dict(record.items())
        del msg.content[api.RUN_CONFIG_RECORD]
        with self._lock:
            context = self._context(msg.metadata.run_id, run_config)
            try:
                reply = self.service.handle(msg, context)
            except Exception:  # pragma: no cover - the service maps every failure
                log.exception("site service failed")
                reply = error_message(msg, ReplyCode.INTERNAL, "")
        return api.encode_message(reply)

    def describe(self) -> bytes:
        """Encode the ``Describe`` reply (API version, policy digest)."""
        info = self.service.describe()
        return api.encode_message(_bare(RecordDict({"describe": ConfigRecord(info)})))


def _bare(content: RecordDict) -> Message:
    """Build a message that answers no coordinator message (the ``Describe`` reply)."""
    return Message(content, dst_node_id=0, message_type=MessageType.QUERY)


class UndecodableRequestError(MedfedError, ValueError):
    """A request on the socket that is not a Flower message (answered INVALID_ARGUMENT)."""


class _OutsideTheApi(grpc.GenericRpcHandler):
    """Answer any method outside the site API: audit the refusal, then UNIMPLEMENTED."""

    def __init__(self, worker: SiteWorker) -> None:
        self.worker = worker

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
            # The method name is the caller's free text: it goes to neither log nor audit.
            log.warning("refusing a call to a method outside the site API")
            AuditLog(self.worker.config.state_dir).append(
                "refusal", code="bad-request", detail="method"
            )
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, fixed_reason(ReplyCode.BAD_REQUEST, "method")
            )
            raise AssertionError("unreachable: abort raises")

        return grpc.unary_unary_rpc_method_handler(refuse)


def _prepare_socket(path: Path) -> None:
    """Make sure ``path`` can be bound: a stale socket is removed, anything else refused.

    Raises
    ------
    ConfigError
        If the path is too long for a Unix socket, exists and is not a socket, or a live
        worker listens on it.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"--socket path is {len(os.fsencode(path))} bytes; a Unix socket path may have "
            f"at most {MAX_SOCKET_PATH}: choose a shorter path (e.g. /run/medfed/worker.sock)"
        )
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)  # no access for others
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"--socket {path} exists and is not a socket; choose another path")
    probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale socket of a worker that is gone
        return
    finally:
        probe.close()
    raise ConfigError(f"another site worker is already listening on {path}")


def start_server(worker: SiteWorker, *, max_threads: int = 4) -> grpc.Server:
    """Bind the worker's Unix socket and start serving the site API.

    The socket is created with umask 0o177 (so never wider than 0600 before the
    ``chmod`` to the configured mode) and served with grpcio's local credentials.

    Returns
    -------
    grpc.Server
        The started server; stop it with ``server.stop(grace)``.

    Raises
    ------
    ConfigError
        If the socket path is taken (see :func:`_prepare_socket`).
    """
    path = worker.config.socket
    _prepare_socket(path)

    def unary(method: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            if method == api.DESCRIBE:
                return worker.describe()
            try:
                return worker.handle(method, request)
            except UndecodableRequestError:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    fixed_reason(ReplyCode.BAD_REQUEST, "decode"),
                )
                raise  # abort raises; keeps type checkers aware

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=None, response_serializer=None
        )

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_threads), options=list(api.GRPC_OPTIONS)
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(api.SERVICE, {m: unary(m) for m in api.METHODS}),
            _OutsideTheApi(worker),
        )
    )
    old = os.umask(0o177)
    try:
        server.add_secure_port(
            f"unix:{path}", grpc.local_server_credentials(grpc.LocalConnectionType.UDS)
        )
        server.start()
    finally:
        os.umask(old)
    path.chmod(worker.config.socket_mode)
    log.info(
        "site worker listening on unix:%s (API v%d, policy %s)",
        path,
        api.API_VERSION,
        worker.policy.digest()[:12],
    )
    return server


@contextmanager
def serving(worker: SiteWorker) -> Iterator[grpc.Server]:
    """Serve until the block exits; the socket is removed afterwards."""
    server = start_server(worker)
    try:
        yield server
    finally:
        server.stop(grace=5.0).wait()
        worker.config.socket.unlink(missing_ok=True)


def serve_forever(worker: SiteWorker) -> None:
    """Serve until SIGTERM or SIGINT; then stop cleanly and remove the socket."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("site worker: signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with serving(worker):
        stop.wait()


__all__ = ["SiteWorker", "WorkerConfig", "serve_forever", "serving", "start_server"]
