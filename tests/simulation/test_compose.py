"""docker-compose.yml is right: parsed, pinned, TLS + node auth everywhere, and it is
the very file the local deployment (medfed deploy-local, test_deployment.py) runs."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from common.errors import ConfigError
from simulation.launch.compose import (
    COMPOSE_FILE,
    expand_env,
    image_entrypoint,
    load_compose,
    local_plan,
    node_config_value,
)
from simulation.launch.deploy import compose_env

ROOT = Path(__file__).resolve().parents[2]
SITES = (1, 2, 3)


@pytest.fixture(scope="module")
def compose():
    return load_compose(COMPOSE_FILE)


def _cmd(compose, service):
    return [str(t) for t in compose["services"][service]["command"]]


def test_images_are_pinned_to_the_installed_and_required_flwr(compose):
    flwr = version("flwr")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pin = project["dependencies"] + project["optional-dependencies"]["fl"]
    assert any(re.match(rf"flwr(\[.*\])?>={re.escape(flwr[:4])}", d) for d in pin)
    medfed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, svc in compose["services"].items():
        _, tag = image_entrypoint(svc["image"])
        if name.startswith("site-worker-"):  # the hospital's own medfed, no Flower inside
            assert tag == medfed, name
        else:
            assert tag.endswith(flwr) or tag == flwr, name
    dockerfile = (ROOT / "docker" / "superexec.Dockerfile").read_text()
    assert f"FROM flwr/superexec:{flwr}" in dockerfile


def test_no_insecure_anywhere_and_tls_plus_node_auth_on(compose):
    assert "--insecure" not in COMPOSE_FILE.read_text()
    assert "--insecure" not in (ROOT / "docker-compose.dev.yml").read_text()
    link = _cmd(compose, "superlink")
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                 "--database", "--disable-runtime-dependency-installation"):  # fmt: skip
        assert flag in link
    for i in SITES:
        node = _cmd(compose, f"supernode-{i}")
        assert "--root-certificates" in node and "--ssl-certfile" in node
        key = node[node.index("--auth-supernode-private-key") + 1]
        assert key == f"/run/secrets/hospital-{i}-key"
    for name in compose["services"]:
        if name.startswith("superexec"):
            assert "--root-certificates" in _cmd(compose, name)


def test_hospital_data_state_and_policy_are_visible_to_its_site_worker_only(compose):
    for name, svc in compose["services"].items():
        mounts = [str(v) for v in svc.get("volumes", [])]
        private = [m for m in mounts if ":/data/" in m or ":/state/" in m or ":/etc/medfed/" in m]
        if name.startswith("site-worker-"):
            i = name.rsplit("-", 1)[1]
            data = [m for m in private if ":/data/" in m]
            assert len(data) == 1 and data[0].endswith(f":/data/hospital-{i}:ro")
            assert any(m.endswith(f":/etc/medfed/hospital-{i}/site-policy.toml:ro") for m in mounts)
            assert any(m.startswith(f"hospital-{i}-state:") for m in mounts)
            assert svc["network_mode"] == "none"  # it cannot send anything anywhere
        else:
            assert not private, f"{name} must not see hospital data, state or policy"
        if name.startswith("superexec-clientapp-"):  # the coordinator's code: a relay
            i = name.rsplit("-", 1)[1]
            assert mounts == [f"hospital-{i}-socket:/run/medfed/hospital-{i}"]
            assert compose["services"][name]["networks"] == [f"hospital-{i}"]
    for i in SITES:  # each private key is given to its own SuperNode only
        holders = [n for n, s in compose["services"].items()
                   if f"hospital-{i}-key" in s.get("secrets", [])]  # fmt: skip
        assert holders == [f"supernode-{i}"]
        assert compose["networks"][f"hospital-{i}"]["internal"] is True


def test_local_plan_runs_the_same_commands_on_loopback(compose, tmp_path):
    # Execute
    plan = local_plan(compose, deploy_dir=tmp_path, env=compose_env(tmp_path, 3))
    # Assert: same flags as the compose file, only addresses and paths substituted
    link = plan.superlink()
    assert link.executable == "flower-superlink"
    assert [t for t in link.argv if t.startswith("--")] == [
        t for t in _cmd(compose, "superlink") if t.startswith("--")
    ]
    assert link.argv[link.argv.index("--ssl-certfile") + 1] == str(tmp_path / "certs/server.pem")
    assert link.argv[link.argv.index("--host") + 1] == "127.0.0.1"
    for i in SITES:
        node = plan.services[f"supernode-{i}"]
        assert node.argv[node.argv.index("--superlink") + 1] == link.address
        assert node.argv[node.argv.index("--auth-supernode-private-key") + 1] == str(
            tmp_path / f"hospital-{i}" / "supernode.key"
        )
        # the SuperNode (and so the FAB's ClientApp) learns only the worker's socket
        assert node_config_value(node, "dataset-dir") is None
        assert node_config_value(node, "state-dir") is None
        socket = tmp_path / "volumes" / f"hospital-{i}-socket" / "worker.sock"
        assert node_config_value(node, "site-worker") == str(socket)
        assert node_config_value(node, "site-id") == f"hospital-{i}"
        worker = plan.worker_for(node)
        assert worker.executable == "medfed" and worker.argv[:2] == ["site", "serve"]
        argv = worker.argv
        assert argv[argv.index("--socket") + 1] == str(socket)
        assert argv[argv.index("--dataset-dir") + 1] == str(tmp_path / "data" / f"site-{i}")
        assert argv[argv.index("--state-dir") + 1] == str(
            tmp_path / "volumes" / f"hospital-{i}-state"
        )
        assert argv[argv.index("--policy") + 1] == str(tmp_path / "policy" / f"site-{i}.toml")
        sx = plan.superexec_for(node)
        assert sx.name == f"superexec-clientapp-{i}"
        assert sx.argv[sx.argv.index("--root-certificates") + 1] == str(tmp_path / "certs/ca.crt")
    assert plan.superexec_for(link).name == "superexec-serverapp"
    ports = [s.port for s in plan.services.values() if s.port is not None]
    assert len(ports) == len(set(ports)) == 4


def test_env_expansion_and_unknown_images():
    assert expand_env("${A:-x}/${B}", {"B": "b"}) == "x/b"
    assert expand_env("${A:-x}", {"A": "a"}) == "a"
    with pytest.raises(ConfigError, match="pinned"):
        image_entrypoint("flwr/superlink:latest")
    with pytest.raises(ConfigError, match="no local equivalent"):
        image_entrypoint("nginx:1.27")


def test_local_processes_get_the_superexec_environment_of_the_compose_file(
    compose, tmp_path, monkeypatch
):
    """deploy-local's Flower processes run with what the compose superexecs set."""
    from simulation.launch.processes import flower_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = flower_env(tmp_path / "flwr-home")
    superexecs = [s for n, s in compose["services"].items() if n.startswith("superexec-")]
    assert superexecs
    for service in superexecs:
        for key, value in service["environment"].items():
            assert env.get(key) == value, key
    assert float(env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]) <= 0.1
