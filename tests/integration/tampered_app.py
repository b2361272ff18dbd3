"""A tampered FAB ClientApp: what a malicious coordinator ships to a hospital.

tests/integration/test_deployment.py copies the project into a fresh app dir and writes
this file over its ``client/app.py``, so this is the ClientApp that every SuperNode runs
for that run (the ServerApp stays the honest one). It never trains. On its train message
it tries, as the coordinator's code inside the hospital, to get anything of value out of
the site:

(a) the site dataset or state through its node config (only ``site-worker`` and
    ``site-id`` should be there) and the files it could name from it;
(b) a method outside the site API (``ExportImages``) and a train message with an extra
    record asking for the training images;
(c) training without DP, and with noise below the site's floor;
(d) a round that would take the site past its epsilon ceiling;
(e) an evaluation: only allow-listed metric names may come back;
(f) more evaluations than the site allows per run.

It writes what each attempt obtained to ``<run-dir>/tampered/<site-id>.json`` (the test
reads it there) and sends the coordinator the global model back unchanged with one metric
per attempt: the reply code it got (0: a reply with content). That reply does not pass
the site's egress rules, which live in the worker: the relay can send the coordinator
anything it *has*; the point is that it has nothing of value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import serde

from client.relay import WORKER_KEY, call_worker, relay

app = ClientApp()

#: Folder under the run dir that receives one report per site.
REPORT_DIR = "tampered"
#: Evaluate messages relayed in one run (the test's policy allows 3).
EVALUATIONS = 5
#: Files of a site dataset and of a site's state dir (client/privacy.py, client/site/audit.py).
SITE_FILES = (
    "manifest.json",
    "train_images.npy",
    "val_images.npy",
    "privacy-ledger.json",
    "privacy-ledger.key",
    "audit.jsonl",
)


def _variant(msg: Message, content: RecordDict, message_type: str | None = None) -> Message:
    """Return ``msg`` (same run, same metadata) with other content and message type."""
    proto = serde.message_to_proto(msg)
    proto.content.CopyFrom(serde.recorddict_to_proto(content))
    if message_type is not None:
        proto.metadata.message_type = message_type
    return serde.message_from_proto(proto)


def _obtained(reply: Message) -> dict[str, Any]:
    """What came back from the site: error code and reason, or the records and their keys."""
    if reply.has_error():
        return {"code": int(reply.error.code), "reason": reply.error.reason, "records": {}}
    records = {name: sorted(str(k) for k in record) for name, record in reply.content.items()}
    arrays = sum(
        len(array.data)
        for record in reply.content.array_records.values()
        for array in record.values()
    )
    return {"code": 0, "reason": "", "records": records, "array-bytes": arrays}


def _node_config_attempt(context: Context) -> dict[str, Any]:
    """(a) Look for the dataset and state dirs in node config, and read what it can name."""
    node_config = {str(k): v for k, v in context.node_config.items()}
    dirs = [Path(str(node_config[k])) for k in ("dataset-dir", "state-dir") if k in node_config]
    dirs += [Path(v).parent for v in node_config.values() if isinstance(v, str) and "/" in v]
    tried, read = [], []
    for folder in dirs:
        for name in SITE_FILES:
            path = folder / name
            tried.append(str(path))
            try:
                with path.open("rb") as fh:
                    fh.read(1)
            except OSError:
                continue
            read.append(str(path))
    return {"node-config-keys": sorted(node_config), "tried": tried, "read": read}


def _export_attempt(socket: str) -> dict[str, Any]:
    """(b) Call a method the site API does not have."""
    try:
        data = call_worker(socket, "ExportImages", b"", timeout=30.0)
    except grpc.RpcError as exc:
        status = exc.code() if isinstance(exc, grpc.Call) else None
        return {"status": status.name if status else "unknown", "bytes": 0}
    return {"status": "OK", "bytes": len(data)}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Try every way out of the site; report it; send the global model back unchanged."""
    socket = str(context.node_config.get(WORKER_KEY, ""))
    run_config = dict(context.run_config)
    base = {name: msg.content[name] for name in ("arrays", "config")}

    def ask(
        content: RecordDict, message_type: str | None = None, cfg: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        request = _variant(msg, content, message_type)
        return _obtained(relay(request, {**run_config, **(cfg or {})}, socket=socket))

    report: dict[str, Any] = {"run-id": int(context.run_id)}
    report["node-config"] = _node_config_attempt(context)
    report["export-images"] = _export_attempt(socket)
    export = ConfigRecord({"what": "train-images"})
    report["extra-record"] = ask(RecordDict({**base, "export": export}))
    report["dp-off"] = ask(RecordDict(base), cfg={"dp.enabled": False})
    report["weak-noise"] = ask(RecordDict(base), cfg={"dp.noise-multiplier": 0.1})
    report["over-budget"] = ask(
        RecordDict(base), cfg={"dp.noise-multiplier": 0.6, "local-epochs": 5}
    )
    report["evaluations"] = [
        ask(RecordDict(base), MessageType.EVALUATE) for _ in range(EVALUATIONS)
    ]

    site = str(context.node_config.get("site-id", context.node_id))
    out = Path(str(run_config["run-dir"])) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{site}.json").write_text(json.dumps(report, indent=1))

    codes: dict[str, int | float] = {
        f"code-{k}": report[k]["code"]
        for k in ("extra-record", "dp-off", "weak-noise", "over-budget")
    }
    codes |= {f"code-evaluate-{i}": e["code"] for i, e in enumerate(report["evaluations"], 1)}
    codes["files-read"] = len(report["node-config"]["read"])
    codes["export-ok"] = int(report["export-images"]["status"] == "OK")
    metrics = MetricRecord({"num-examples": 1, **codes})
    return Message(RecordDict({"arrays": base["arrays"], "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Relay an evaluate message unchanged (the test's run sends none)."""
    return relay(msg, context.run_config, socket=str(context.node_config[WORKER_KEY]))
