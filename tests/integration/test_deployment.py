"""A real deployment on loopback: SuperLink + SuperExecs + 3 SuperNodes from docker-compose.yml.

TLS on every link, SuperNode authentication with registered EC keys, tiny real data.
One module-scoped federation serves every test here (start-up is the expensive part):
the federated run (2 rounds, one hospital killed after round 1) and the refusals of an
unregistered key, a client without the CA certificate and a plaintext client; under
``-m slow`` also a tampered ClientApp (FAB) whose data tensor the egress guard blocks.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.tls import write_node_keys
from simulation.deploy import (
    LocalFederation,
    default_run_config,
    local_federation,
    pid_alive,
    prepare_credentials,
    prepare_policies,
    prepare_site_datasets,
)
from simulation.processes import bin_path, free_port

pytestmark = pytest.mark.integration

IMAGES_PER_SITE = 120


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
    # Each hospital's own policy: the default, but this file's run trains without SecAgg+
    # (its 4 exchanges per round; tests/integration/test_secagg_e2e.py covers SecAgg+).
    prepare_policies(deploy_dir, num_sites=3, overrides={"require_secagg": False})
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


TAMPER = """

# ---- tampered by tests/integration/test_deployment.py: smuggle data out of the site
_honest_train_content = train_content


def train_content(job):  # noqa: F811
    from flwr.app import Array

    content = _honest_train_content(job)
    content["arrays"]["leak"] = Array(job.data.load("train").images[:2])
    return content
"""


@pytest.mark.slow  # a second federated run (~45 s); the mod itself: tests/client/test_egress.py
def test_tampered_clientapp_cannot_send_a_data_tensor(federation: LocalFederation, tmp_path):
    # Prepare: a FAB whose ClientApp adds training images to its update
    import shutil

    fed = federation
    app_dir = tmp_path / "tampered-app"
    app_dir.mkdir()
    root = Path(__file__).resolve().parents[2]
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, app_dir / name)
    for pkg in ("common", "client", "server", "simulation"):
        shutil.copytree(root / pkg, app_dir / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    app_py = app_dir / "client" / "app.py"
    app_py.write_text(app_py.read_text() + TAMPER)
    for i in (1, 2, 3):  # a hospital killed by an earlier test comes back
        node = fed.plan.services[f"supernode-{i}"]
        if not fed.group.procs[node.name].alive():
            fed.start_site(node)
    fed.wait_online(3)
    run_dir = tmp_path / "run"
    cfg = default_run_config(
        fed.deploy_dir,
        run_dir,
        # plain FedAvg, so the guard sees the handler's reply as it would leave the site
        **{"num-server-rounds": 1, "min-sites": 3, "min-replies": 2, "round-timeout": 60.0,
           "fraction-evaluate": 0.0, "secagg.enabled": False, "dp.enabled": False},
    )  # fmt: skip

    # Execute
    fed.run(cfg, timeout=240, app_dir=app_dir)

    # Assert: every site refused its own reply; the round failed loudly, no model saved
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1]
    assert "quorum" in rounds[1]["error"]
    failed = rounds[1]["train"]["failed"]
    assert len(failed) >= 2
    assert all("egress guard refused the reply" in v and "'leak'" in v for v in failed.values())
    assert rounds[1]["train"]["bytes-up"] == 0
    assert not (run_dir / "final_model.pt").exists()
    site_logs = "".join(
        (fed.group.log_dir / f"superexec-clientapp-{i}.log").read_text() for i in (1, 2, 3)
    )
    assert "egress guard refused the reply" in site_logs
