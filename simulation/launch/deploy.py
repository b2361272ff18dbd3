"""A real federation on one machine: SuperLink + SuperExecs + SuperNodes as processes.

``medfed deploy-local`` (and tests/integration/test_deployment.py) run the services of
``docker-compose.yml`` (see :mod:`simulation.launch.compose`) as local processes on loopback:
TLS on every link, SuperNode authentication with registered EC keys, a persistent
SuperLink database, one site dataset, state dir and site id per hospital. Every process
started is stopped by process group when the block ends (normally, on error, Ctrl-C or
SIGTERM).

Layout of a deployment directory (``deploy_dir``)::

    certs/            ca.crt ca.key server.pem server.key supernode-N.pem/.key
    hospital-N/       supernode.key supernode.key.pub        (medfed site keys)
    data/site-N/      the hospital's site dataset            (prepare_site_datasets)
    data/global-val/  the coordinator's held-out evaluation set
    volumes/          named compose volumes (SuperLink database, site state)
    flwr-home/        FLWR_HOME: config.toml with the TLS connection, logs/
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, FederationError
from common.fsutil import check_replaceable, swap_dir
from common.site_dataset import why_not_site_dataset
from common.tls import (
    check_node_key_pair,
    check_server_files,
    write_dev_certificates,
    write_node_keys,
)
from common.waiting import wait_for_nodes
from simulation.launch.compose import (
    COMPOSE_FILE,
    LocalPlan,
    LocalService,
    load_compose,
    local_plan,
    node_config_value,
)
from simulation.launch.engine import run_config_args
from simulation.launch.processes import (
    ProcessGroup,
    bin_path,
    flower_env,
    stream_command,
    wait_listening,
)

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "medfed-local"
LABEL_NAMES = ("normal", "pneumonia")

#: Which data path builds the hospitals' site datasets: "dicom" (export -> ingest, the
#: hospital path) or "virtual" (simulation.data.sites.create_virtual_sites). One line to switch.
SITE_SOURCE = "dicom"


def hospital_names(num_sites: int) -> list[str]:
    """``hospital-1 .. hospital-N`` (compose naming)."""
    return [f"hospital-{i}" for i in range(1, num_sites + 1)]


def prepare_credentials(deploy_dir: Path, *, num_sites: int, force: bool = False) -> None:
    """Write the development CA/certificates and one SuperNode key pair per hospital.

    The server certificate names ``superlink`` (compose), ``localhost`` and 127.0.0.1;
    each ``supernode-N`` gets a Runtime-API certificate for its SuperExec link.
    Existing files are kept (and checked) unless ``force``.
    """
    certs = deploy_dir / "certs"
    if force or not (certs / "ca.crt").exists():
        write_dev_certificates(
            certs,
            hosts=["superlink"],
            ips=[],
            sites=[f"supernode-{i}" for i in range(1, num_sites + 1)],
            force=force,
        )
    check_server_files(
        certs / "server.pem",
        certs / "server.key",
        certs / "ca.crt",
        names=["127.0.0.1", "superlink"],
    )
    for name in hospital_names(num_sites):
        key_dir = deploy_dir / name
        if force or not (key_dir / "supernode.key").exists():
            write_node_keys(key_dir, force=force)
        check_node_key_pair(key_dir / "supernode.key", key_dir / "supernode.key.pub")


def _tiny_npz(
    npz_path: Path, out: Path, *, images_per_site: int, num_sites: int, seed: int
) -> Path:
    """Write a seeded random subset of ``npz_path`` (train + val splits) to ``out``."""
    rng = np.random.default_rng(seed)
    with np.load(npz_path) as z:
        data = {k: z[k] for k in z.files}
    subset: dict[str, np.ndarray] = {}
    wanted = {"train": images_per_site * num_sites, "val": max(64, images_per_site // 2)}
    for split, n in wanted.items():
        labels = data[f"{split}_labels"].reshape(-1)
        idx = np.sort(rng.choice(labels.size, size=min(n, labels.size), replace=False))
        subset[f"{split}_images"] = data[f"{split}_images"][idx]
        subset[f"{split}_labels"] = data[f"{split}_labels"][idx]
    np.savez(out, **subset)  # type: ignore[arg-type]
    return out


def prepare_site_datasets(
    npz_path: Path,
    deploy_dir: Path,
    *,
    num_sites: int,
    images_per_site: int | None = None,
    seed: int = 42,
    source: str = SITE_SOURCE,
) -> list[Path]:
    """Build one site dataset per hospital under ``<deploy_dir>/data`` (+ ``global-val``).

    ``source="virtual"`` partitions the public dataset IID with
    :func:`simulation.data.sites.create_virtual_sites`; ``source="dicom"`` writes each
    partition as a DICOM export (``medfed export-dicom``) and ingests it the way a
    hospital would (``medfed ingest``).

    Returns
    -------
    list[pathlib.Path]
        ``data/site-1 .. data/site-N`` (compose's ``MEDFED_SITE_N_DATA``).

    """
    from simulation.data.sites import SplitPlan, create_virtual_sites

    if source not in ("dicom", "virtual"):
        raise ConfigError(f"source must be 'dicom' or 'virtual', got {source!r}")
    data_dir = deploy_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    # fail before any work if a target is not a previous site dataset medfed wrote
    for name in [*(f"site-{i + 1}" for i in range(num_sites)), "global-val"]:
        check_replaceable(
            data_dir / name, overwrite=True, why_not_ours=why_not_site_dataset, what="site dataset"
        )
    src = npz_path
    if images_per_site is not None:
        src = _tiny_npz(
            npz_path,
            deploy_dir / "subset.npz",
            images_per_site=images_per_site,
            num_sites=num_sites,
            seed=seed,
        )
    # A fresh work folder of our own: deleting it at the end can only delete what we wrote.
    work = Path(tempfile.mkdtemp(prefix=".work-sites-", dir=deploy_dir))
    try:
        create_virtual_sites(
            src,
            work,
            plan=SplitPlan(num_sites=num_sites, partitioner="iid", seed=seed),
            label_names=LABEL_NAMES,
            dataset_name=npz_path.stem,
        )
        if source == "dicom" and not dicom_path_available():
            log.warning("DICOM export/ingest not installed; using virtual site datasets")
            source = "virtual"
        if source == "dicom":
            _dicom_sites(src, work, deploy_dir=deploy_dir, num_sites=num_sites, seed=seed)
        sites = []
        for i in range(num_sites):
            dst = data_dir / f"site-{i + 1}"
            # replaces a previous site dataset atomically; refuses anything else there
            swap_dir(work / f"site-{i}", dst, why_not_ours=why_not_site_dataset)
            sites.append(dst)
        if (work / "global-val").exists():
            swap_dir(
                work / "global-val", data_dir / "global-val", why_not_ours=why_not_site_dataset
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sites


def dicom_path_available() -> bool:
    """Whether ``medfed export-dicom`` and ``medfed ingest`` are installed."""
    import importlib.util

    return all(
        importlib.util.find_spec(m) is not None
        for m in ("simulation.data.export_dicom", "client.data.ingest")
    )


def _dicom_sites(npz: Path, work: Path, *, deploy_dir: Path, num_sites: int, seed: int) -> None:
    """Replace ``work/site-i`` by ``medfed export-dicom`` -> ``medfed ingest`` (hospital path).

    The training split is written as one DICOM export per hospital (IID partition,
    de-identified Secondary Capture files + labels.csv) and each export is ingested like
    a hospital would, with the site's own salt and cache under ``hospital-N/``.
    """
    medfed = bin_path("medfed")
    exports = work / "dicom-exports"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}

    def run(argv: list[str], what: str) -> None:
        res = subprocess.run(argv, check=False, **quiet)  # type: ignore[call-overload]
        if res.returncode != 0:
            raise FederationError(f"{what} failed (exit {res.returncode}): {res.stderr[-2000:]}")

    run(
        [medfed, "export-dicom", "--data", str(npz), "--sites", str(num_sites),
         "--out", str(exports), "--seed", str(seed), "--force"],
        "medfed export-dicom",
    )  # fmt: skip
    for i in range(num_sites):
        site_dir = deploy_dir / f"hospital-{i + 1}"
        run(  # --force: replaces the virtual site-i (a medfed site dataset) atomically
            [medfed, "ingest", "--force", str(exports / f"site_{i}" / "dicom"),
             "--labels", str(exports / f"site_{i}" / "labels.csv"),
             "--label-names", ",".join(LABEL_NAMES), "--size", "28", "--workers", "1",
             "--seed", str(seed), "--salt-file", str(site_dir / "ingest-salt"),
             "--cache-dir", str(site_dir / "ingest-cache"), "--out", str(work / f"site-{i}")],
            f"medfed ingest (hospital-{i + 1})",
        )  # fmt: skip
    shutil.rmtree(exports, ignore_errors=True)


def write_connection(flwr_home: Path, *, address: str, ca_cert: Path) -> None:
    """Write ``<flwr_home>/config.toml`` with one TLS connection named ``medfed-local``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )


@dataclass
class LocalFederation:
    """A running local federation (yielded by :func:`local_federation`)."""

    deploy_dir: Path
    plan: LocalPlan
    group: ProcessGroup
    flwr_home: Path
    env: dict[str, str]

    @property
    def superlink(self) -> LocalService:
        """The SuperLink service (its address is ``superlink.address``)."""
        return self.plan.superlink()

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` CLI command against this federation's SuperLink."""
        return subprocess.run(
            [bin_path("flwr"), *args],
            env=self.env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def register(self, public_key: Path) -> None:
        """``flwr supernode register KEY.pub`` (idempotent: an already known key is fine).

        Raises
        ------
        FederationError
            If the SuperLink refuses the key for another reason.

        """
        res = self.flwr("supernode", "register", str(public_key), CONNECTION)
        if res.returncode != 0 and "already" not in (res.stdout + res.stderr).lower():
            raise FederationError(f"registering {public_key} failed: {res.stdout}{res.stderr}")

    def online_nodes(self) -> int:
        """Return how many SuperNodes the SuperLink reports online."""
        res = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        if res.returncode != 0:
            return 0
        try:
            nodes = json.loads(res.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def start_site(self, supernode: LocalService) -> None:
        """Start one hospital: its site worker, SuperNode and the SuperExec of its ClientApp."""
        if node_config_value(supernode, "site-worker") is not None:
            worker = self.plan.worker_for(supernode)
            wk = self.group.start(worker.name, [bin_path(worker.executable), *worker.argv])
            wait_listening(Path(_socket(worker)), wk.proc, wk.log_file, 120.0, name=worker.name)
        sn = self.group.start(supernode.name, [bin_path(supernode.executable), *supernode.argv])
        wait_listening(_port(supernode), sn.proc, sn.log_file, 60.0, name=supernode.name)
        sx = self.plan.superexec_for(supernode)
        self.group.start(sx.name, [bin_path(sx.executable), *sx.argv])

    def stop_site(self, supernode: LocalService, *, kill: bool = False) -> None:
        """Stop (or SIGKILL, to simulate a crash) one hospital's processes."""
        names = [supernode.name, self.plan.superexec_for(supernode).name]
        if node_config_value(supernode, "site-worker") is not None:
            names.append(self.plan.worker_for(supernode).name)
        for name in names:
            if kill:
                self.group.kill(name)
            else:
                self.group.stop(name)

    def wait_online(self, count: int, *, timeout: float = 90.0) -> None:
        """Wait until ``count`` SuperNodes are online.

        Raises
        ------
        FederationError
            After ``timeout`` seconds.

        """
        n = wait_for_nodes(self.online_nodes, at_least=count, timeout=timeout)
        if n < count:
            raise FederationError(
                f"only {n} of {count} SuperNodes came online within {timeout:.0f} s; "
                f"see the logs in {self.group.log_dir}"
            )

    def run(
        self,
        run_config: Mapping[str, object],
        *,
        on_line: Callable[[str], None] | None = None,
        timeout: float = 1800.0,
        app_dir: Path = PROJECT_ROOT,
    ) -> int:
        """``flwr run <app_dir> medfed-local --stream``; return its exit code.

        A watchdog stops ``flwr run`` after ``timeout`` seconds.
        """
        cmd = [bin_path("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        cmd += run_config_args(run_config)
        return stream_command(
            cmd,
            env=self.env,
            cwd=app_dir,
            log_path=self.group.log_dir / "flwr-run.log",
            on_line=on_line,
            timeout=timeout,
        )


def _socket(service: LocalService) -> str:
    for i, tok in enumerate(service.argv[:-1]):
        if tok == "--socket":
            return service.argv[i + 1]
    raise ConfigError(f"compose service {service.name} has no --socket")


def _port(service: LocalService) -> int:
    if service.port is None:
        raise ConfigError(f"compose service {service.name} has no --port; it must listen")
    return service.port


def compose_env(deploy_dir: Path, num_sites: int) -> dict[str, str]:
    """Variables that point the compose file's secrets, data and policy mounts at ``deploy_dir``."""
    env = {"MEDFED_DEPLOY_DIR": str(deploy_dir)}
    for i in range(1, num_sites + 1):
        env[f"MEDFED_SITE_{i}_DATA"] = str(deploy_dir / "data" / f"site-{i}")
        env[f"MEDFED_SITE_{i}_POLICY"] = str(policy_path(deploy_dir, i))
    return env


def policy_path(deploy_dir: Path, site: int) -> Path:
    """Where a local deployment keeps hospital ``site``'s policy file."""
    return deploy_dir / "policy" / f"site-{site}.toml"


def prepare_policies(
    deploy_dir: Path, *, num_sites: int, overrides: Mapping[str, Any] | None = None
) -> list[Path]:
    """Write each hospital's site policy (as ``medfed site policy init``) if it has none.

    Parameters
    ----------
    overrides : Mapping, optional
        :class:`~client.site.policy.SitePolicy` fields (snake_case) that differ from the
        default, e.g. ``{"require_secagg": False}`` for a test without SecAgg+; applied
        only to files written now.

    Raises
    ------
    ConfigError
        If an existing policy file does not load.
    """
    import dataclasses

    from client.site.policy import SitePolicy

    policy = dataclasses.replace(SitePolicy.default(), **dict(overrides or {}))
    paths = []
    for i in range(1, num_sites + 1):
        path = policy_path(deploy_dir, i)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(policy.to_toml())
        SitePolicy.load(path)  # fail before any process starts
        paths.append(path)
    return paths


@contextlib.contextmanager
def local_federation(
    deploy_dir: Path,
    *,
    compose_file: Path = COMPOSE_FILE,
    start_sites: bool = True,
    register: bool = True,
    startup_timeout: float = 60.0,
) -> Iterator[LocalFederation]:
    """Start the compose services locally; yield a :class:`LocalFederation`; stop all.

    Order: SuperLink (TLS, node auth, database) -> wait for its port -> ServerApp
    SuperExec -> register every hospital's public key -> per hospital site worker (wait
    for its socket) + SuperNode + ClientApp SuperExec -> wait until all are online.
    Hospitals without a policy file get the default one (:func:`prepare_policies`).

    Raises
    ------
    FederationError
        If a process fails to start or a SuperNode does not come online.

    """
    deploy_dir = deploy_dir.resolve()
    compose = load_compose(compose_file)
    num_sites = sum(1 for s in compose["services"] if s.startswith("supernode-"))
    prepare_policies(deploy_dir, num_sites=num_sites)
    plan = local_plan(compose, deploy_dir=deploy_dir, env=compose_env(deploy_dir, num_sites))
    for path in plan.volumes.values():
        path.mkdir(parents=True, exist_ok=True)
    flwr_home = deploy_dir / "flwr-home"
    env = flower_env(flwr_home)
    link = plan.superlink()
    write_connection(flwr_home, address=link.address, ca_cert=plan.secrets["ca-cert"])
    with ProcessGroup(flwr_home / "logs", env=env, cwd=PROJECT_ROOT) as group:
        fed = LocalFederation(deploy_dir, plan, group, flwr_home, env)
        sl = group.start(link.name, [bin_path(link.executable), *link.argv])
        wait_listening(_port(link), sl.proc, sl.log_file, startup_timeout, name="SuperLink")
        server_sx = plan.superexec_for(link)
        group.start(server_sx.name, [bin_path(server_sx.executable), *server_sx.argv])
        supernodes = plan.by_role("supernode")
        if register:
            for i in range(1, len(supernodes) + 1):
                fed.register(deploy_dir / f"hospital-{i}" / "supernode.key.pub")
        if start_sites:
            for sn in supernodes:
                fed.start_site(sn)
            fed.wait_online(len(supernodes), timeout=startup_timeout)
        yield fed


def default_run_config(deploy_dir: Path, run_dir: Path, **overrides: object) -> dict[str, object]:
    """Run config for a local deployment: run dir and global evaluation set in ``deploy_dir``."""
    cfg: dict[str, object] = {"run-dir": str(run_dir)}
    gv = deploy_dir / "data" / "global-val"
    if gv.exists():
        cfg["eval-dataset-dir"] = str(gv)
    cfg.update(overrides)
    return cfg


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
