"""The site worker as a real process, driven the way a (tampered) relay ClientApp could.

Issue 12: whatever the coordinator's FAB code asks of the worker over its socket, it
gets only what the site policy allows, a refusal naming the rule otherwise, and every
request lands in the site's audit log. These tests start ``medfed site serve`` as a
subprocess and talk to it with the relay's own code (client/relay.py) or raw gRPC.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from client.relay import call_worker, relay
from client.site import api
from common.models import get_model
from common.records import state_to_record
from common.replies import ReplyCode
from tests.server.messages import new_message
from tests.sites import tiny_site

MEDFED = str(Path(sys.executable).parent / "medfed")


@dataclass
class Worker:
    socket: Path
    state_dir: Path
    proc: subprocess.Popen[bytes]
    root: Path


def _site(path: Path) -> Path:
    return tiny_site(path, train=40, val=24)


POLICY = """
version = 1
[privacy]
max-epsilon = 3.0
min-noise-multiplier = 0.5
[secure-aggregation]
require-secagg = false
[training]
max-local-epochs = 50
[evaluation]
max-evaluations-per-run = 2
min-eval-images = 20
{extra}
"""


def _start(root: Path, *, extra: str = "") -> Worker:
    root.mkdir(parents=True, exist_ok=True)
    policy = root / "policy.toml"
    policy.write_text(POLICY.format(extra=extra))
    data = _site(root / "data")
    state = root / "state"
    socket = root / "worker.sock"
    log = (root / "worker.log").open("wb")
    proc = subprocess.Popen(
        [
            MEDFED,
            "site",
            "serve",
            "--policy",
            str(policy),
            "--dataset-dir",
            str(data),
            "--state-dir",
            str(state),
            "--socket",
            str(socket),
            "--device",
            "cpu",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((root / "worker.log").read_text()[-3000:])
        time.sleep(0.2)
    return Worker(socket, state, proc, root)


def _stop(worker: Worker) -> None:
    worker.proc.terminate()
    assert worker.proc.wait(timeout=30) == 0, (worker.root / "worker.log").read_text()[-2000:]
    assert not worker.socket.exists()  # it removes its socket


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = _start(tmp_path_factory.mktemp("site"))
    yield w
    _stop(w)


RUN = {"batch-size": 8, "secagg.enabled": False, "dp.noise-multiplier": 1.0, "seed": 1}


def _content(server_round: int = 1) -> RecordDict:
    torch.manual_seed(0)
    return RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )


def _send(worker: Worker, message_type: str, run_id: int = 1, content=None, **run):
    msg = new_message(content or _content(), message_type, 7, "1", run_id=run_id)
    return relay(msg, {**RUN, **run}, socket=str(worker.socket))


def _audit(worker: Worker) -> list[dict]:
    lines = (worker.state_dir / "audit.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def _refused(reply, code: ReplyCode, detail: str = "") -> None:
    assert reply.has_error(), "expected a refusal, got content"
    assert reply.error.code == code, reply.error.reason
    if detail:
        assert reply.error.reason.endswith(f": {detail}"), reply.error.reason


def test_honest_dp_round_returns_only_the_update_and_is_audited(worker):
    # Execute
    reply = _send(worker, "train", run_id=11)
    # Assert: the DP update and allow-listed metrics; the socket is owner-only
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # the model, metrics and the validation score histogram (summed by the coordinator)
    assert set(reply.content.keys()) == {"arrays", "metrics", "medfed.secure-sum"}
    metrics = reply.content.metric_records["metrics"]
    assert 0 < float(metrics["epsilon"]) <= 3.0
    assert stat.S_IMODE(worker.socket.stat().st_mode) == 0o600
    events = [e for e in _audit(worker) if e.get("run-id") == 11]
    assert [e["event"] for e in events] == ["request", "reply"]
    assert events[1]["bytes-out"] > 0 and events[1]["records"]["metrics"]


def test_a_tampered_relay_cannot_reach_raw_data_or_fields_outside_the_api(worker):
    # (b) a method that is not in the API
    with pytest.raises(grpc.RpcError) as info:
        call_worker(str(worker.socket), "ExportImages", b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert {"event": "refusal", "code": "bad-request", "detail": "method"}.items() <= _audit(
        worker
    )[-1].items()
    # (b) bytes that are not a message
    with pytest.raises(grpc.RpcError) as info:
        call_worker(str(worker.socket), api.TRAIN, b"\x00\xff" * 8, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # (b) a record outside the API, asking for images
    content = _content()
    content["export"] = ConfigRecord({"what": "train-images"})
    _refused(_send(worker, "train", run_id=12, content=content), ReplyCode.BAD_REQUEST)
    # (b) a message type outside the API
    _refused(_send(worker, "query", run_id=12), ReplyCode.BAD_REQUEST)


def test_dp_off_or_weak_noise_is_refused_before_any_work(worker):
    before = (worker.state_dir / "privacy-ledger.json").read_bytes()
    # (c) DP off, then noise below the policy's floor
    _refused(
        _send(worker, "train", run_id=13, **{"dp.enabled": False}), ReplyCode.POLICY, "require-dp"
    )
    _refused(
        _send(worker, "train", run_id=13, **{"dp.noise-multiplier": 0.1}),
        ReplyCode.POLICY,
        "min-noise-multiplier",
    )
    # nothing was trained or charged
    assert (worker.state_dir / "privacy-ledger.json").read_bytes() == before


def test_more_epsilon_than_the_ceiling_is_refused(worker):
    # (d) 50 local epochs at noise 0.6 cross max-epsilon = 3
    reply = _send(worker, "train", run_id=14, **{"dp.noise-multiplier": 0.6, "local-epochs": 50})
    _refused(reply, ReplyCode.PRIVACY_BUDGET)


def test_evaluations_are_limited_per_run(worker):
    # (f) two evaluations pass, the third is refused
    for _ in range(2):
        reply = _send(worker, "evaluate", run_id=15)
        assert not reply.has_error(), reply.error.reason
        acc = float(reply.content.metric_records["metrics"]["val-accuracy"])
        assert acc == round(acc, 3)  # rounded to metric-decimals
    _refused(_send(worker, "evaluate", run_id=15), ReplyCode.POLICY, "max-evaluations-per-run")
    # another run has its own count
    assert not _send(worker, "evaluate", run_id=16).has_error()


def test_every_refusal_is_in_the_audit_log_and_no_reason_names_a_path(worker):
    reply = _send(worker, "train", run_id=17, **{"dp.enabled": False})
    assert str(worker.root) not in reply.error.reason
    refusals = [e for e in _audit(worker) if e["event"] == "refusal"]
    assert {"run-id": 17, "code": "policy", "detail": "require-dp"}.items() <= next(
        e for e in refusals if e.get("run-id") == 17
    ).items()
    assert all(str(worker.root) not in json.dumps(e) for e in _audit(worker))
    assert (
        subprocess.run([MEDFED, "site", "audit", "verify", str(worker.state_dir)]).returncode == 0
    )


def test_a_metric_the_policy_does_not_allow_never_leaves(tmp_path):
    # (e) this site allows no AUROC and no training loss in replies
    w = _start(
        tmp_path,
        extra='[egress]\nallowed-metrics = ["num-examples", "val-accuracy", "epsilon", '
        '"delta", "train-steps"]',
    )
    try:
        evaluated = _send(w, "evaluate", run_id=21)
        trained = _send(w, "train", run_id=21)
        assert set(evaluated.content.metric_records["metrics"]) == {"num-examples", "val-accuracy"}
        assert "train-loss" not in trained.content.metric_records["metrics"]
        left = [e for e in _audit(w) if e["event"] == "reply" and e.get("run-id") == 21]
        assert all("val-auroc" not in e["records"].get("metrics", []) for e in left)
    finally:
        _stop(w)


def test_free_text_from_the_coordinator_is_never_written_to_the_audit_log(worker):
    # Prepare: a project "name" that is a path and markup
    project = "/etc/passwd [red]x[/red]"
    # Execute
    _send(worker, "train", run_id=31, project=project)
    # Assert
    entry = next(e for e in _audit(worker) if e.get("run-id") == 31 and e["event"] == "request")
    assert entry["project"].startswith("sha256:")
    assert "passwd" not in json.dumps(_audit(worker))


def test_a_socket_path_too_long_for_unix_is_refused_with_a_clear_error(tmp_path):
    from client.site.worker import _prepare_socket
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="shorter path"):
        _prepare_socket(tmp_path / ("x" * 120) / "worker.sock")
