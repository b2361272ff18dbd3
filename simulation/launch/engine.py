"""Run the medfed Flower app on Flower's simulation engine (Ray), the supported 1.4x way.

``flwr run . <connection>`` against a SuperLink started with ``--simulation``. medfed
starts that SuperLink itself, on a free loopback port, with a run-local ``FLWR_HOME``
(nothing touches ``~/.flwr``), telemetry and runtime dependency installation off, and
always stops it (and its process group) when the run ends, fails or is interrupted.
Flower's own ``:local:`` connection would leave a detached SuperLink running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from common.errors import FederationError
from simulation.launch.processes import (
    bin_path,
    flower_env,
    free_port,
    sigterm_as_interrupt,
    stop_process,
    stream_command,
    wait_listening,
)

log = logging.getLogger(__name__)

CONNECTION = "medfed-sim"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


# Generic process management lives in simulation/launch/processes.py (shared with deploy.py).


#: Ray reads the address of an existing cluster from this variable when ``ray.init()`` is
#: called without one (ray/_private/worker.py, ``init``); Flower's RayBackend
#: (flwr/server/superlink/fleet/vce/backend/raybackend.py, ``init_ray``) calls it so.
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def simulation_settings(
    flwr_home: Path,
    *,
    num_sites: int,
    cpus_per_site: int = 1,
    gpus_per_site: float = 0.0,
    ray_address: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Return ``flwr run --federation-config`` pairs and the SuperLink's environment.

    Flower 1.41's federation config has no Ray address (only ``init-args-num-cpus``,
    ``-num-gpus``, ``-logging-level``, ``-log-to-driver``), so a multi-machine Ray
    cluster is selected by ``RAY_ADDRESS`` in the environment of the simulation
    SuperLink, which its ``flwr-simulation`` process (the Ray driver) inherits. With an
    address, ``init-args-num-cpus`` is left out: Ray refuses ``num_cpus`` when it
    connects to an existing cluster, whose resources are the cluster's own.

    Parameters
    ----------
    flwr_home : pathlib.Path
        FLWR_HOME of the run (:func:`simulation.launch.processes.flower_env`).
    num_sites, cpus_per_site, gpus_per_site
        See :func:`run_simulation`.
    ray_address : str, optional
        ``auto``, ``HEAD_IP:6379`` or ``ray://HEAD_IP:10001``; None starts a local Ray
        instance with this machine's cores (the default).

    Returns
    -------
    tuple[list[str], dict[str, str]]
        The ``key=value`` federation-config pairs and the environment.

    """
    env = flower_env(flwr_home)
    fed = [
        f"num-supernodes={num_sites}",
        f"client-resources-num-cpus={cpus_per_site}",
        f"client-resources-num-gpus={gpus_per_site}",
    ]
    if ray_address:
        env[RAY_ADDRESS_ENV] = ray_address
    else:
        env.pop(RAY_ADDRESS_ENV, None)  # never join a cluster the caller did not name
        fed.append(f"init-args-num-cpus={max(1, os.cpu_count() or 1)}")
    return fed, env


@contextlib.contextmanager
def simulation_superlink(
    flwr_home: Path, *, startup_timeout: float = 60.0, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Start a ``--simulation`` SuperLink on a free port; yield its address; stop it.

    The connection is written to ``<flwr_home>/config.toml`` as ``[superlink.medfed-sim]``.
    Loopback only and plaintext: it never leaves this machine. ``env`` (default
    :func:`~simulation.launch.processes.flower_env`) is the SuperLink's environment, inherited
    by the Ray driver it starts (``RAY_ADDRESS``, see :func:`simulation_settings`).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )
    log_file = flwr_home / "superlink.log"
    cmd = [
        bin_path("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(flwr_home / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=env if env is not None else flower_env(flwr_home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # SIGTERM (e.g. `timeout`, a CI runner) must unwind through `finally` like Ctrl-C.
    with sigterm_as_interrupt():
        try:
            wait_listening(port, proc, log_file, startup_timeout, name="SuperLink")
            log.info("simulation SuperLink on %s (pid %d, log %s)", address, proc.pid, log_file)
            yield address
        finally:
            stop_process(proc, name="SuperLink")


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_config_args(run_config: Mapping[str, object]) -> list[str]:
    """``--run-config`` arguments for ``flwr run``: all ``key=value`` pairs in ONE flag.

    Flower 1.41 parses each flag as its own TOML document and merges them with a shallow
    ``dict.update``, so with one flag per key only the last key of a dotted group
    (``dp.*``, ``secagg.*``) survived; one document keeps every key of every group.
    """
    pairs = [f"{k}={_toml_value(v)}" for k, v in run_config.items()]
    return ["--run-config", " ".join(pairs)] if pairs else []


def run_simulation(
    *,
    run_dir: Path,
    run_config: Mapping[str, object],
    num_sites: int,
    cpus_per_site: int = 1,
    gpus_per_site: float = 0.0,
    app_dir: Path = PROJECT_ROOT,
    on_line: Callable[[str], None] | None = None,
    timeout: float = 3600.0,
    ray_address: str | None = None,
) -> None:
    """Run the medfed app on ``num_sites`` virtual SuperNodes and wait for it to end.

    Parameters
    ----------
    run_dir : pathlib.Path
        Run directory; holds ``.flwr`` (FLWR_HOME) and ``flwr-run.log``.
    run_config : Mapping
        Run-config overrides (must include ``run-dir`` and ``sites-dir``).
    num_sites : int
        Virtual SuperNodes (``num-supernodes``).
    cpus_per_site : int
        CPUs per ClientApp (Ray resource ``client-resources-num-cpus``).
    gpus_per_site : float
        Ray resources per ClientApp (``client-resources-num-cpus`` / ``-gpus``); with
        1 CPU each, a 2-core machine trains 2 sites at once.
    app_dir : pathlib.Path
        The Flower app (this project) that ``flwr run`` builds into a FAB.
    on_line : callable, optional
        Called with every line ``flwr run --stream`` prints (progress display).
    timeout : float
        Seconds before the run is stopped and :class:`FederationError` raised.
    ray_address : str, optional
        Run the virtual sites on this existing Ray cluster (``auto``, ``HEAD_IP:6379``);
        None: a local Ray instance (see :func:`simulation_settings`).

    Raises
    ------
    FederationError
        If the SuperLink cannot start, the run fails or exceeds ``timeout``.

    """
    flwr_home = run_dir / ".flwr"
    fed, env = simulation_settings(
        flwr_home,
        num_sites=num_sites,
        cpus_per_site=cpus_per_site,
        gpus_per_site=gpus_per_site,
        ray_address=ray_address,
    )
    with simulation_superlink(flwr_home, env=env):
        cmd = [bin_path("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        cmd += run_config_args(run_config)
        cmd += ["--federation-config", " ".join(fed)]
        log_path = run_dir / "flwr-run.log"
        code = stream_command(
            cmd, env=env, cwd=app_dir, log_path=log_path, on_line=on_line, timeout=timeout
        )
    if code != 0 or not (run_dir / "final_model.pt").exists():
        raise FederationError(
            f"the federated run did not finish (exit code {code}); see {log_path} "
            f"and {flwr_home / 'superlink.log'}"
        )
