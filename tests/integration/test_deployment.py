"""A real deployment on loopback: SuperLink + SuperExecs + 3 SuperNodes from docker-compose.yml.

TLS on every link, SuperNode authentication with registered EC keys, tiny real data.
One module-scoped federation serves every test here (start-up is the expensive part):
the federated run (2 rounds, one hospital killed after round 1) and the refusals of an
unregistered key, a client without the CA certificate and a plaintext client; under
``-m slow`` also a tampered FAB whose ClientApp tries every way to get data out of its
hospital's site worker (tests/integration/tampered_app.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.site.policy import STANDARD_METRICS
from common.replies import ReplyCode, fixed_reason
from common.tls import write_node_keys
from simulation.launch.deploy import (
    LocalFederation,
    default_run_config,
    local_federation,
    pid_alive,
    prepare_credentials,
    prepare_policies,
    prepare_site_datasets,
)
from simulation.launch.processes import bin_path, free_port

pytestmark = pytest.mark.integration

IMAGES_PER_SITE = 120
#: Each hospital's policy in this file: the default, but this file's runs train without
#: SecAgg+ (its 4 exchanges per round; tests/integration/test_secagg_e2e.py covers
#: SecAgg+); at most 3 evaluations per run, over the 12 validation images a site has;
#: and two standard metrics the hospital does not let out.
WITHHELD_METRICS = ("val-auroc", "val-f1")
ALLOWED_METRICS = tuple(m for m in STANDARD_METRICS if m not in WITHHELD_METRICS)
MAX_EVALUATIONS = 3
POLICY = {
    "require_secagg": False,
    "max_evaluations_per_run": MAX_EVALUATIONS,
    "min_eval_images": 10,
    "allowed_metrics": ALLOWED_METRICS,
}


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, pneumonia_npz: Path
) -> Iterator[LocalFederation]:
    deploy_dir = tmp_path_factory.mktemp("deploy")
    prepare_credentials(deploy_dir, num_sites=3)
    # Virtual sites keep this file fast; `medfed deploy-local` takes the DICOM path
    # (export -> ingest), which the DICOM tests cover.
    prepare_site_datasets(
        pneumonia_npz,
        deploy_dir,
        num_sites=3,
        images_per_site=IMAGES_PER_SITE,
        source="virtual",
    )
    prepare_policies(deploy_dir, num_sites=3, overrides=POLICY)
    with local_federation(deploy_dir) as fed:
        yield fed
    # Assert (teardown): every process the federation started is gone
    left = [m.name for m in fed.group.procs.values() if pid_alive(m.pid)]
    assert not left, f"processes left running: {left}"


def _refused(fed: LocalFederation, name: str, argv: list[str]) -> str:
    """Start a SuperNode that should be refused; return its log once it exits."""
    proc = fed.group.start(name, [bin_path("flower-supernode"), *argv, "--max-retries", "1"])
    proc.proc.wait(timeout=60)
    assert proc.proc.returncode != 0
    return proc.log_file.read_text()


def _supernode_argv_with(fed: LocalFederation, **replace: str) -> list[str]:
    argv = list(fed.plan.services["supernode-1"].argv)
    for old, new in replace.items():
        argv = [a.replace(old, new) for a in argv]
    argv[argv.index("--port") + 1] = str(free_port())
    return argv


def test_three_hospitals_two_rounds_survive_a_killed_site(federation: LocalFederation):
    # Prepare
    fed = federation
    run_dir = fed.deploy_dir / "run"
    cfg = default_run_config(
        fed.deploy_dir,
        run_dir,
        **{
            "num-server-rounds": 2,
            "min-sites": 3,
            "min-replies": 2,
            # generous for a loaded 2-core machine; the killed site's round ends earlier
            # when the SuperLink marks it offline (missed heartbeats -> NODE_UNAVAILABLE)
            "round-timeout": 90.0,
            "fraction-evaluate": 0.0,
            # plain FedAvg keeps this under the time budget (SecAgg+ runs 4 message
            # exchanges per round; tests/integration/test_secagg_e2e.py covers it)
            "secagg.enabled": False,
        },
    )
    result: dict[str, int] = {}
    runner = threading.Thread(target=lambda: result.setdefault("rc", fed.run(cfg, timeout=300)))
    victim = fed.plan.services["supernode-3"]

    # Execute: kill hospital 3 (SuperNode + SuperExec, SIGKILL) once round 1 is logged
    runner.start()
    deadline = time.monotonic() + 240
    while not any(r["round"] == 1 for r in _rounds(run_dir)) and time.monotonic() < deadline:
        assert runner.is_alive(), (fed.group.log_dir / "flwr-run.log").read_text()[-3000:]
        time.sleep(0.5)
    fed.stop_site(victim, kill=True)
    runner.join(timeout=300)

    # Assert
    assert result.get("rc") == 0, (fed.group.log_dir / "flwr-run.log").read_text()[-3000:]
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, second = rounds[1]["train"], rounds[2]["train"]
    assert len(first["sampled"]) == 3 and len(first["replied"]) == 3
    assert not first["dropped"] and not first["failed"]
    assert len(second["replied"]) == 2
    lost = set(second["dropped"]) | {int(k) for k in second["failed"]}
    assert len(lost) == 1 and lost.isdisjoint(second["replied"])
    assert (run_dir / "final_model.pt").exists()
    # bytes up per site = one model update (no extra payload past the egress guard)
    per_site_up = first["bytes-up"] / 3
    assert per_site_up == pytest.approx(first["bytes-down"] / 3, rel=0.01)


def test_unregistered_supernode_key_is_refused(federation: LocalFederation, tmp_path: Path):
    # Prepare: a valid key pair the coordinator never registered
    rogue = write_node_keys(tmp_path / "rogue")
    argv = _supernode_argv_with(
        federation,
        **{str(federation.deploy_dir / "hospital-1" / "supernode.key"): str(rogue.private_key)},
    )
    # Execute
    log = _refused(federation, "rogue-supernode", argv)
    # Assert
    assert "Failed to activate SuperNode" in log


def test_client_without_ca_certificate_cannot_connect(federation: LocalFederation):
    # Prepare: the same SuperNode command line minus --root-certificates
    argv = _supernode_argv_with(federation)
    i = argv.index("--root-certificates")
    del argv[i : i + 2]
    # Execute
    log = _refused(federation, "no-ca-supernode", argv)
    # Assert
    assert "CERTIFICATE_VERIFY_FAILED" in log


def test_plaintext_client_is_refused(federation: LocalFederation):
    # Prepare: a SuperNode that speaks plaintext HTTP to the TLS-only SuperLink
    link = federation.superlink
    argv = ["--insecure", "--superlink", link.address, "--port", str(free_port())]
    # Execute
    log = _refused(federation, "plaintext-supernode", argv)
    # Assert
    assert "could not establish a connection" in log
    nodes = federation.flwr("supernode", "list", "medfed-local", "--format", "json")
    assert len(json.loads(nodes.stdout)["nodes"]) == 3


def _tampered_app(tmp_path: Path) -> Path:
    """A copy of this project whose ClientApp is tests/integration/tampered_app.py."""
    app_dir = tmp_path / "tampered-app"
    app_dir.mkdir()
    root = Path(__file__).resolve().parents[2]
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, app_dir / name)
    for pkg in ("common", "client", "server", "simulation"):
        shutil.copytree(root / pkg, app_dir / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("tampered_app.py"), app_dir / "client" / "app.py")
    return app_dir


def _audit(state_dir: Path, run_id: int) -> list[dict]:
    lines = (state_dir / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("run-id") == run_id]


#: What each attempt of the tampered ClientApp must get: a code and the rule it broke.
REFUSED = {
    "extra-record": (ReplyCode.BAD_REQUEST, "record-name"),
    "dp-off": (ReplyCode.POLICY, "require-dp"),
    "weak-noise": (ReplyCode.POLICY, "min-noise-multiplier"),
    "over-budget": (ReplyCode.PRIVACY_BUDGET, ""),
}


@pytest.mark.slow  # a second federated run (+ hospital 3 restarted): 140-165 s on 2 cores
def test_tampered_clientapp_gets_nothing_from_the_site_worker(
    federation: LocalFederation, tmp_path: Path
):
    # Prepare: a FAB whose ClientApp, on its train message, asks its hospital's site
    # worker for data, for training outside the policy and for evaluations past the limit
    # (tests/integration/tampered_app.py); every hospital up (an earlier test killed one)
    fed = federation
    app_dir = _tampered_app(tmp_path)
    for i in (1, 2, 3):
        node = fed.plan.services[f"supernode-{i}"]
        if not fed.group.procs[node.name].alive():
            fed.start_site(node)
    fed.wait_online(3)
    run_dir = tmp_path / "run"
    cfg = default_run_config(
        fed.deploy_dir,
        run_dir,
        **{"num-server-rounds": 1, "min-sites": 3, "min-replies": 1, "round-timeout": 120.0,
           "fraction-evaluate": 0.0, "secagg.enabled": False},
    )  # fmt: skip

    # Execute
    rc = fed.run(cfg, timeout=300, app_dir=app_dir)

    # Assert: the run ended, every hospital's tampered ClientApp reported
    log = (fed.group.log_dir / "flwr-run.log").read_text()[-3000:]
    assert rc == 0, log
    reports = {
        i: json.loads((run_dir / "tampered" / f"hospital-{i}.json").read_text()) for i in (1, 2, 3)
    }
    deploy_dir = str(fed.deploy_dir)
    for i, report in reports.items():
        # (a) node config names only the worker's socket and the site id, and nothing the
        # ClientApp can name from it is readable. In deploy-local every process runs as
        # one OS user, so only docker-compose's separate containers isolate the worker's
        # files at the OS level; this test does not scan the filesystem.
        assert report["node-config"]["node-config-keys"] == ["site-id", "site-worker"]
        assert report["node-config"]["tried"] and report["node-config"]["read"] == []
        # (b) a method outside the site API does not exist on the worker's socket
        assert report["export-images"] == {"status": "UNIMPLEMENTED", "bytes": 0}
        # (b)-(d) an extra record, no DP, weak noise, over the ceiling: refused, nothing back
        for attempt, (code, detail) in REFUSED.items():
            got = report[attempt]
            assert got["code"] == code, (i, attempt, got)
            assert got["reason"] == fixed_reason(code, detail), (i, attempt, got)
            assert got["records"] == {}
        # (e) an evaluation returns allow-listed metrics only, never a withheld one, and
        # (SecAgg+ off, a binary classifier with an operating point) the site's validation
        # score histogram, which the egress schema checks (common/secure_sum.py): float32
        # counts of shape (2, operating-point-bins), nothing else
        evaluations = report["evaluations"]
        for got in evaluations[:MAX_EVALUATIONS]:
            assert got["code"] == 0, (i, got)
            assert set(got["records"]) == {"metrics", "medfed.secure-sum"}, (i, got)
            assert got["records"]["medfed.secure-sum"] == ["score-histogram"], (i, got)
            assert 0 < got["array-bytes"] <= 2 * 100 * 4 + 256, (i, got)
            names = set(got["records"]["metrics"])
            assert "num-examples" in names and names <= set(ALLOWED_METRICS), (i, names)
            assert names.isdisjoint(WITHHELD_METRICS)
        # (f) every evaluation past the policy's limit is refused
        assert len(evaluations) > MAX_EVALUATIONS
        reason = fixed_reason(ReplyCode.POLICY, "max-evaluations-per-run")
        for got in evaluations[MAX_EVALUATIONS:]:
            assert (got["code"], got["reason"], got["records"]) == (ReplyCode.POLICY, reason, {})
        # no reply reason names a path
        reasons = [report[a]["reason"] for a in REFUSED] + [e["reason"] for e in evaluations]
        assert not any("/" in r or deploy_dir in r for r in reasons), reasons

    # Assert: each hospital's audit log holds every refusal; only the evaluations' metrics
    # left the site; the log and the ledger verify
    expected = [("train", c.name.lower().replace("_", "-"), d) for c, d in REFUSED.values()]
    expected += [("evaluate", "policy", "max-evaluations-per-run")] * (
        len(evaluations) - MAX_EVALUATIONS
    )
    state_dirs = {i: fed.plan.volumes[f"hospital-{i}-state"] for i in reports}
    verify = {
        i: subprocess.Popen(
            [bin_path("medfed"), "site", "audit", "verify", str(d)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, d in state_dirs.items()
    }
    verified = {i: (p.communicate(timeout=180)[0], p.returncode) for i, p in verify.items()}
    for i, report in reports.items():
        entries = _audit(state_dirs[i], report["run-id"])
        # one request entry per relayed message; the unknown gRPC method (b) is answered
        # UNIMPLEMENTED by grpcio before the site service, so it leaves no audit entry
        requests = [e for e in entries if e["event"] == "request"]
        assert len(requests) == len(REFUSED) + len(evaluations), (i, requests)
        refusals = [
            (e["message-type"], e["code"], e["detail"]) for e in entries if e["event"] == "refusal"
        ]
        assert refusals == expected, (i, refusals)
        replies = [e for e in entries if e["event"] == "reply"]
        assert [e["message-type"] for e in replies] == ["evaluate"] * MAX_EVALUATIONS
        assert all(set(e["records"]) == {"metrics", "medfed.secure-sum"} for e in replies), replies
    for i, (out, rc_verify) in verified.items():
        assert rc_verify == 0, (i, out)

    # Assert: the coordinator got what the ClientApps report, and nothing but the model
    # it sent (the reply is the tampered relay's own: egress rules live in the worker)
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1]
    train = rounds[1]["train"]
    assert len(train["replied"]) == 3 and not train["failed"]
    assert train["bytes-up"] == train["bytes-down"]
    for site in train["sites"].values():
        assert site["files-read"] == 0 and site["export-ok"] == 0
        assert {k: site[f"code-{k}"] for k in REFUSED} == {k: c for k, (c, _) in REFUSED.items()}
        codes = [site[f"code-evaluate-{n}"] for n in range(1, len(evaluations) + 1)]
        assert codes == [0] * MAX_EVALUATIONS + [ReplyCode.POLICY] * (
            len(evaluations) - MAX_EVALUATIONS
        )
