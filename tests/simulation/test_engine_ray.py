"""`medfed simulate --ray-address` selects an existing Ray cluster (no cluster needed).

The path under test: ``--ray-address`` -> :func:`simulation.launch.engine.run_simulation` ->
:func:`simulation.launch.engine.simulation_settings` (federation config + the SuperLink's
environment) -> Flower's own parsing of ``--federation-config`` and its simulation
settings -> Flower's ``RayBackend.init_ray`` -> ``ray.init``, which is replaced by a
recorder. Ray reads ``RAY_ADDRESS`` when ``ray.init`` is called without an address.
"""

import os

import pytest
from flwr.cli.run.run import _parse_federation_config_overrides
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.app import _run_simulation_settings
from typer.testing import CliRunner

from common import cli
from common.errors import FederationError
from simulation.launch import engine

ADDRESS = "10.0.0.5:6379"


def _ray_init_call(fed: list[str], env: dict[str, str], monkeypatch) -> tuple[dict, dict]:
    """Run Flower's parsing and RayBackend.init_ray on ``fed`` under ``env``; record ray.init."""
    sim_cfg = _parse_federation_config_overrides([" ".join(fed)], superlink_connection=_NoConn())
    num_sites, backend, backend_config, _, _ = _run_simulation_settings(sim_cfg)
    calls: list[tuple[dict, dict]] = []
    monkeypatch.setattr(raybackend.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(raybackend.ray, "init", lambda **kw: calls.append((kw, dict(os.environ))))
    for key in ("RAY_ADDRESS", "PYTHONPATH"):  # flwr-simulation inherits the SuperLink's env
        monkeypatch.delenv(key, raising=False)
        if key in env:
            monkeypatch.setenv(key, env[key])
    backend_obj = raybackend.RayBackend.__new__(raybackend.RayBackend)
    backend_obj.init_args_key = "init_args"
    backend_obj.init_ray(backend_config)
    assert (num_sites, backend) == (7, "ray")
    assert len(calls) == 1
    return calls[0]


class _NoConn:
    """A SuperLink connection without the deprecated ``options`` table."""

    options = None


def test_ray_address_reaches_ray_init_through_flower(tmp_path, monkeypatch):
    # Prepare
    fed, env = engine.simulation_settings(
        tmp_path / ".flwr", num_sites=7, cpus_per_site=1, ray_address=ADDRESS
    )
    # Execute
    kwargs, ray_env = _ray_init_call(fed, env, monkeypatch)
    # Assert: Ray gets the cluster's address from RAY_ADDRESS, and no num_cpus (Ray
    # refuses num_cpus when it connects to an existing cluster)
    assert ray_env["RAY_ADDRESS"] == ADDRESS
    assert "address" not in kwargs and "num_cpus" not in kwargs
    assert not any(p.startswith("init-args-num-cpus") for p in fed)


def test_without_address_ray_starts_locally_even_if_caller_env_has_one(tmp_path, monkeypatch):
    # Prepare: a stray RAY_ADDRESS in the caller's shell must not send the run elsewhere
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.1:6379")
    fed, env = engine.simulation_settings(tmp_path / ".flwr", num_sites=7, cpus_per_site=1)
    # Execute
    kwargs, ray_env = _ray_init_call(fed, env, monkeypatch)
    # Assert
    assert "RAY_ADDRESS" not in ray_env
    assert kwargs["num_cpus"] == max(1, os.cpu_count() or 1)


def test_simulate_cli_passes_ray_address_to_the_engine(tmp_path, monkeypatch):
    # Prepare: a data root with a (never read) npz; no sites are written, no run starts
    (tmp_path / "data" / "pneumoniamnist").mkdir(parents=True)
    (tmp_path / "data" / "pneumoniamnist" / "pneumoniamnist.npz").write_bytes(b"")
    seen: dict[str, object] = {}

    def fake_run_simulation(**kwargs):
        seen.update(kwargs)
        raise FederationError("stopped by the test")

    monkeypatch.setattr("simulation.data.sites.create_virtual_sites", lambda *a, **k: [])
    monkeypatch.setattr(engine, "run_simulation", fake_run_simulation)
    monkeypatch.setattr("simulation.cli._check_gpus", lambda gpus: None)  # no torch import
    cli._register_plugins()
    # Execute
    result = CliRunner().invoke(
        cli.app,
        ["simulate", "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"),
         "--ray-address", ADDRESS, "--rounds", "1"],
    )  # fmt: skip
    # Assert
    assert result.exit_code == 2, result.output
    assert "stopped by the test" in result.output
    assert seen["ray_address"] == ADDRESS


@pytest.mark.parametrize("address", [None, ""])
def test_no_address_means_local_ray(tmp_path, address):
    fed, env = engine.simulation_settings(tmp_path, num_sites=2, ray_address=address)
    assert "RAY_ADDRESS" not in env
    assert any(p.startswith("init-args-num-cpus=") for p in fed)
