"""Derive local processes from ``docker-compose.yml``: one source of truth for deployment.

Docker does not run everywhere (not on the CI machines), so ``medfed deploy-local`` and
the deployment integration test do not keep their own copy of the Flower command lines:
they parse the compose file and run each service's ``command:`` as a local process with
the image's entry point (``flwr/superlink`` -> ``flower-superlink`` ...). Only
addresses and paths are substituted:

* ``<service>:<port>`` -> ``127.0.0.1:<free port of that service>``; ``--host 0.0.0.0``
  -> ``--host 127.0.0.1``; a service's own ``--port`` -> its free port;
* ``/run/secrets/<name>`` -> the secret's ``file:`` (``${VAR:-default}`` expanded);
* a container path mounted from a volume -> the host directory (named volumes become
  ``<deploy_dir>/volumes/<name>``).

So if the compose file is wrong, the local federation built from it fails too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError
from simulation.launch.processes import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"

#: Image (without tag) -> console script it runs (the image's entry point).
ENTRYPOINTS = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "flwr/superexec": "flower-superexec",
    "medfed/superexec": "flower-superexec",
    "medfed/site-worker": "medfed",
}

#: Console script -> role of its service (default: the script without ``flower-``).
ROLES = {"medfed": "worker"}

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` like docker compose does."""

    def sub(m: re.Match[str]) -> str:
        value = env.get(m.group(1), "")
        return value if value else (m.group(2) or "")

    return _ENV_RE.sub(sub, text)


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """Parse a compose file (YAML anchors and merge keys resolved).

    Raises
    ------
    ConfigError
        If the file is missing, not YAML, or has no ``services``.

    """
    if not path.is_file():
        raise ConfigError(f"compose file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise ConfigError(f"{path} has no 'services' mapping")
    return data


def image_entrypoint(image: str) -> tuple[str, str]:
    """Split ``repo:tag`` and return ``(console script, tag)``.

    Raises
    ------
    ConfigError
        For an image medfed does not know how to run locally, or an unpinned tag.

    """
    repo, _, tag = image.partition(":")
    if repo not in ENTRYPOINTS:
        raise ConfigError(f"image {image!r}: no local equivalent (known: {sorted(ENTRYPOINTS)})")
    if not tag or tag == "latest":
        raise ConfigError(f"image {image!r} must be pinned to a version tag")
    return ENTRYPOINTS[repo], tag


@dataclass(frozen=True)
class LocalService:
    """One compose service as a local process."""

    name: str
    executable: str
    argv: list[str]
    port: int | None
    role: str  # superlink | supernode | superexec | worker

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>`` of the service (for services that listen)."""
        if self.port is None:
            raise ConfigError(f"service {self.name} does not listen on a port")
        return f"127.0.0.1:{self.port}"


@dataclass
class LocalPlan:
    """All services of a compose file translated for one machine."""

    services: dict[str, LocalService]
    secrets: dict[str, Path]
    volumes: dict[str, Path] = field(default_factory=dict)

    def by_role(self, role: str) -> list[LocalService]:
        """Services of one role, in file order."""
        return [s for s in self.services.values() if s.role == role]

    def superlink(self) -> LocalService:
        """Return the (single) SuperLink service."""
        links = self.by_role("superlink")
        if len(links) != 1:
            raise ConfigError(f"expected one superlink service, found {len(links)}")
        return links[0]

    def superexec_for(self, service: LocalService) -> LocalService:
        """Return the SuperExec whose ``--runtime-api-address`` is ``service``."""
        for s in self.by_role("superexec"):
            if _flag(s.argv, "--runtime-api-address") == service.address:
                return s
        raise ConfigError(f"no superexec service connects to {service.name}")

    def worker_for(self, supernode: LocalService) -> LocalService:
        """Return the site worker whose ``--socket`` is the SuperNode's ``site-worker``."""
        socket = node_config_value(supernode, "site-worker")
        for s in self.by_role("worker"):
            if socket is not None and _flag(s.argv, "--socket") == socket:
                return s
        raise ConfigError(
            f"no site-worker service serves the socket of {supernode.name} "
            "(node config 'site-worker' must equal the worker's --socket)"
        )


def _flag(argv: list[str], name: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == name and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


def _role(executable: str) -> str:
    return ROLES.get(executable, executable.removeprefix("flower-"))


def _local_argv(raw: list[str], *, port: int | None, substitute: Callable[[str], str]) -> list[str]:
    """Return a service's command for loopback: ``--host`` 127.0.0.1 and its local ``--port``."""
    argv: list[str] = []
    i = 0
    while i < len(raw):
        tok = raw[i]
        if tok == "--host" and i + 1 < len(raw):
            argv += ["--host", "127.0.0.1"]
            i += 2
            continue
        if tok == "--port" and i + 1 < len(raw):
            argv += ["--port", str(port)]
            i += 2
            continue
        argv.append(substitute(tok))
        i += 1
    return argv


def local_plan(
    compose: Mapping[str, Any],
    *,
    deploy_dir: Path,
    env: Mapping[str, str] | None = None,
    ports: Mapping[str, int] | None = None,
    base_dir: Path = PROJECT_ROOT,
) -> LocalPlan:
    """Translate every service of ``compose`` into a local command line.

    Parameters
    ----------
    compose : Mapping
        Parsed compose file (:func:`load_compose`).
    deploy_dir : pathlib.Path
        Where named volumes live (``<deploy_dir>/volumes/<name>``); also the default of
        ``MEDFED_DEPLOY_DIR`` when ``env`` does not set it.
    env : Mapping[str, str], optional
        Variables for ``${VAR:-default}`` expansion (defaults to ``os.environ``).
    ports : Mapping[str, int], optional
        Local port per listening service; free ports are picked for the others.
    base_dir : pathlib.Path
        Relative host paths in the compose file are relative to this folder.

    Returns
    -------
    LocalPlan

    Raises
    ------
    ConfigError
        Unknown image, unpinned tag, a secret or volume that is not defined, or two
        services mounting different host paths at one container path.

    """
    env = dict(os.environ if env is None else env)
    env.setdefault("MEDFED_DEPLOY_DIR", str(deploy_dir))
    services: Mapping[str, Any] = compose["services"]

    def host_path(raw: str) -> Path:
        p = Path(expand_env(raw, env)).expanduser()
        return p if p.is_absolute() else (base_dir / p).resolve()

    secrets = {
        name: host_path(str(spec["file"])) for name, spec in (compose.get("secrets") or {}).items()
    }
    named_volumes = set(compose.get("volumes") or {})
    mounts: dict[str, Path] = {}
    volumes: dict[str, Path] = {}
    for svc_name, svc in services.items():
        for vol in svc.get("volumes") or []:
            src, dst = expand_env(str(vol), env).split(":")[:2]
            src_path = deploy_dir / "volumes" / src if src in named_volumes else host_path(src)
            if src in named_volumes:
                volumes[src] = src_path
            if dst in mounts and mounts[dst] != src_path:
                raise ConfigError(
                    f"service {svc_name}: container path {dst} is mounted from two host paths; "
                    "give each hospital its own container path"
                )
            mounts[dst] = src_path

    chosen = dict(ports or {})
    listening = {
        name: svc for name, svc in services.items() if "--port" in (svc.get("command") or [])
    }
    for name in listening:
        chosen.setdefault(name, free_port())

    def substitute(token: str) -> str:
        token = expand_env(token, env)
        for name, port in chosen.items():
            token = re.sub(rf"\b{re.escape(name)}:\d+\b", f"127.0.0.1:{port}", token)
        if token.startswith("/run/secrets/"):
            secret = token.removeprefix("/run/secrets/")
            if secret not in secrets:
                raise ConfigError(f"secret {secret!r} is used but not defined under 'secrets:'")
            return str(secrets[secret])
        for dst in sorted(mounts, key=len, reverse=True):
            token = re.sub(rf"(?<![\w/]){re.escape(dst)}(?=/|'|\"|$)", str(mounts[dst]), token)
        return token

    out: dict[str, LocalService] = {}
    for name, svc in services.items():
        executable, _tag = image_entrypoint(str(svc.get("image", "")))
        raw = [str(t) for t in (svc.get("command") or [])]
        out[name] = LocalService(
            name=name,
            executable=executable,
            argv=_local_argv(raw, port=chosen.get(name), substitute=substitute),
            port=chosen.get(name),
            role=_role(executable),
        )
    return LocalPlan(services=out, secrets=secrets, volumes=volumes)


def node_config_value(service: LocalService, key: str) -> str | None:
    """Value of one ``--node-config`` key of a SuperNode service (quotes stripped)."""
    raw = _flag(service.argv, "--node-config")
    if raw is None:
        return None
    for pair in raw.split():
        k, _, v = pair.partition("=")
        if k == key:
            return v.strip("'\"")
    return None
