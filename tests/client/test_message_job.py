"""One message, resolved once (issue 15, item 3), and what a site worker's chain holds.

Each test sends one message through the real site service (client/site/service.py:
request and policy checks, SecAgg+ mod, the train/evaluate handler on a real tiny site
dataset, the egress guard, the audit log) and counts, by wrapping the real functions,
how often the run config is parsed, the model built, the state dir and the ledger key
resolved: once each, however many steps read them (client/site/job.py).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

import client.privacy
import common.models.cnn
from client.site.service import SiteService
from client.site.simulated import FAULT_MODS, research_policy
from common.config import NodeConfig, RunConfig
from common.models import get_model
from common.records import state_to_record
from common.secagg.params import ADVERTISE, RECORD
from common.secagg.schema import Header
from tests.server.messages import new_message
from tests.sites import tiny_site

SESSION = bytes(range(16))


@pytest.fixture
def site(tmp_path):
    return tiny_site(tmp_path / "site", train=16, val=8)


@pytest.fixture
def calls(monkeypatch) -> Counter[str]:
    """Count run-config parses, model builds, state-dir and ledger-key resolutions."""
    counts: Counter[str] = Counter()

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    parse = RunConfig.from_run_config.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(RunConfig, "from_run_config", classmethod(counting("run-config", parse)))
    # the registry imports the factory by name on every get_model: every build counts
    monkeypatch.setattr(
        common.models.cnn, "build_cnn", counting("model", common.models.cnn.build_cnn)
    )
    monkeypatch.setattr(
        NodeConfig, "resolve_state_dir", counting("state-dir", NodeConfig.resolve_state_dir)
    )
    monkeypatch.setattr(
        client.privacy, "ledger_key", counting("ledger-key", client.privacy.ledger_key)
    )
    return counts


def _context(site, **run) -> Context:
    return Context(
        run_id=1,
        node_id=5,
        node_config={"dataset-dir": str(site), "state-dir": str(site.parent / "state")},
        state=RecordDict(),
        run_config={"batch-size": 8, "local-epochs": 1, **run},
    )


def _content(**extra) -> RecordDict:
    torch.manual_seed(0)
    model = get_model("cnn")
    content = RecordDict(
        {"arrays": state_to_record(model), "config": ConfigRecord({"server-round": 1})}
    )
    for name, record in extra.items():
        content[name] = record
    return content


def _scaffold_c() -> ArrayRecord:
    return ArrayRecord(
        {n: torch.zeros_like(p).detach() for n, p in get_model("cnn").named_parameters()}
    )


@pytest.mark.parametrize(
    ("run", "records"),
    [
        pytest.param(
            {"secagg.enabled": False, "dp.enabled": True, "dp.noise-multiplier": 1.0},
            {},
            id="plain-dp",
        ),
        pytest.param(
            {"secagg.enabled": False, "dp.enabled": False, "strategy": "scaffold", "momentum": 0.0},
            {"scaffold-c": "scaffold"},
            id="plain-scaffold",
        ),
        pytest.param(
            {"secagg.enabled": True, "dp.enabled": True, "dp.noise-multiplier": 1.0},
            {RECORD: "advertise"},
            id="secagg-advertise",
        ),
    ],
)
def test_a_train_message_parses_the_run_config_once_and_builds_the_model_once(
    site, calls, run, records
):
    # Prepare: the message and a site worker's service (built before counting starts)
    extra = {
        name: _scaffold_c() if kind == "scaffold" else Header(ADVERTISE, 1, SESSION).record()
        for name, kind in records.items()
    }
    msg = new_message(_content(**extra), "train", 5, "1")
    context = _context(site, **{"evaluate-in-train": True, **run})
    service = SiteService(policy=research_policy(), simulated=False)
    calls.clear()
    # Execute
    reply = service.handle(msg, context)
    # Assert: the message was trained and left (SecAgg+: the advertised keys) ...
    assert not reply.has_error(), reply.error
    expected_records = {"metrics", RECORD} if RECORD in records else {"arrays", "metrics"}
    if "scaffold-c" in records:
        expected_records.add("scaffold-dc")
    assert expected_records <= set(reply.content.keys())
    # ... with each piece resolved once for the service, SecAgg+, handler and egress
    assert calls["run-config"] == 1
    assert calls["model"] == 1
    # the state dir and ledger key: the privacy ledger, the SCAFFOLD variate's file and
    # the policy's evaluation count (the audit log) share one resolution
    assert calls["state-dir"] == 1
    assert calls["ledger-key"] == (1 if run["dp.enabled"] or "scaffold-c" in records else 0)


def test_an_evaluate_message_parses_the_run_config_once_and_builds_the_model_once(site, calls):
    # Prepare
    msg = new_message(_content(), "evaluate", 5, "1")
    context = _context(site, **{"secagg.enabled": False, "dp.enabled": False})
    service = SiteService(policy=research_policy(), simulated=False)
    calls.clear()
    # Execute
    reply = service.handle(msg, context)
    # Assert: the policy's evaluation check and the handler share one dataset and model
    assert not reply.has_error(), reply.error
    assert calls["run-config"] == 1
    assert calls["model"] == 1


def test_nothing_is_kept_from_one_message_to_the_next(site, calls):
    # Prepare: two messages of the same run
    context = _context(site, **{"secagg.enabled": False, "dp.enabled": False})
    service = SiteService(policy=research_policy(), simulated=False)
    messages = [new_message(_content(), "evaluate", 5, "1") for _ in range(2)]
    calls.clear()
    # Execute
    replies = [service.handle(msg, context) for msg in messages]
    # Assert: each message resolved its own (no cache across messages)
    assert not any(r.has_error() for r in replies)
    assert calls["run-config"] == 2
    assert calls["model"] == 2


# ========================================= what a site worker's chain holds (item 6)
def test_a_site_worker_service_refuses_the_simulation_fault_mods():
    with pytest.raises(ValueError, match="simulation only"):
        SiteService(policy=research_policy(), simulated=False, mods=FAULT_MODS)


def test_the_site_worker_never_imports_fault_injection():
    code = (
        "import sys\n"
        "import client.site.worker, client.site.service, client.egress, client.secagg_mod\n"
        "print('client.faults' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_importing_the_mods_registers_no_egress_records():
    # Item 5: the allow-list is the egress guard's fixed table; no import extends it
    code = (
        "from client.egress import PROTOCOL_RECORDS\n"
        "before = dict(PROTOCOL_RECORDS)\n"
        "import client.secagg_mod, client.scaffold, client.site.service, client.site.simulated\n"
        "print(dict(PROTOCOL_RECORDS) == before, sorted(before))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "True ['masked', 'scaffold-dc', 'secagg']"


def test_egress_judges_the_request_as_the_coordinator_sent_it(site):
    """A mod that rewrites the request after its handler ran cannot change the schema."""
    # Prepare: a plain train request (no SecAgg+), and a simulated mod that afterwards
    # makes the request look like a SecAgg+ share-keys stage, whose schema would refuse
    # the plain model reply
    from client.site.service import SiteMods

    def rewrite_request(msg, context, call_next):
        reply = call_next(msg, context)
        header = Header(stage="share-keys", server_round=1, session=SESSION)
        msg.content[RECORD] = header.record()
        return reply

    mods = SiteMods(outer=(rewrite_request,))
    service = SiteService(policy=research_policy(), simulated=True, mods=mods)
    msg = new_message(_content(), "train", 5, "1")
    # Execute
    reply = service.handle(msg, _context(site, **{"secagg.enabled": False, "dp.enabled": False}))
    # Assert: the reply to the plain request left, checked against the plain schema
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert "arrays" in reply.content.array_records
