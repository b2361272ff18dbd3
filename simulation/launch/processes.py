"""Process management shared by the simulation engine and the local deployment.

Every Flower process medfed starts (SuperLink, SuperExec, SuperNode, ``flwr run``) is
started in its own session (process group) with a run-local ``FLWR_HOME``, telemetry and
runtime dependency installation off, and stopped by process group: SIGTERM, then
SIGKILL after a grace period. :class:`ProcessGroup` owns a set of such processes and
stops all of them when its ``with`` block ends, whether it ends normally, by an
exception or by Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from common.errors import FederationError

log = logging.getLogger(__name__)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bin_path(name: str) -> str:
    """Path of a console script installed beside this interpreter (the venv)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise FederationError(f"`{name}` not found; install medfed's dependencies (make setup)")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: run-local home, no telemetry, offline-safe.

    The venv's ``bin`` goes first on ``PATH``: SuperExec launches ``flwr-serverapp`` /
    ``flwr-clientapp`` by name.
    """
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # SuperExec: check for new tasks every 0.1 s instead of 1 s (docker-compose.yml).
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
            "PYTHONUNBUFFERED": "1",
            # Ray workers / ClientApps must not each grab every core of a small machine.
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "RAY_DEDUP_LOGS": "0",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }
    )
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    return env


def stop_process(proc: subprocess.Popen[bytes], *, name: str, grace: float = 10.0) -> None:
    """Stop ``proc`` and its process group: SIGTERM, then SIGKILL after ``grace`` s.

    The group is signalled even when the leader already exited, so children it left
    behind (a SuperExec's ClientApp) go too.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    if proc.poll() is not None:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


def _wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    log_file: Path,
    timeout: float,
    *,
    name: str,
    what: str,
) -> None:
    """Poll ``ready`` every 0.2 s until it is true, ``proc`` exits or ``timeout`` passes.

    Raises
    ------
    FederationError
        If ``proc`` exits first or ``ready`` stays false for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationError(
                f"{name} exited with code {proc.returncode} at start-up; see {log_file}"
            )
        if ready():
            return
        time.sleep(0.2)
    raise FederationError(f"{name} did not open {what} within {timeout:.0f} s; see {log_file}")


def wait_listening(
    address: int | Path,
    proc: subprocess.Popen[bytes],
    log_file: Path,
    timeout: float,
    *,
    name: str,
) -> None:
    """Wait until ``address`` accepts connections or ``proc`` exits.

    Parameters
    ----------
    address : int or pathlib.Path
        A TCP port on ``127.0.0.1``, or the path of a Unix socket.

    Raises
    ------
    FederationError
        If ``proc`` exits first or ``address`` stays closed for ``timeout`` seconds.

    """

    def ready() -> bool:
        if isinstance(address, Path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                return address.exists() and s.connect_ex(str(address)) == 0
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", address)) == 0

    what = str(address) if isinstance(address, Path) else f"port {address}"
    _wait_until(ready, proc, log_file, timeout, name=name, what=what)


@dataclass
class Managed:
    """One started process, its name and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_file: Path

    @property
    def pid(self) -> int:
        """Process id (= process group id: each process gets its own session)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None


class ProcessGroup:
    """Start named processes with logs in ``log_dir``; stop them all on exit.

    Use as a context manager; processes are stopped in reverse start order (SuperExecs
    and SuperNodes before the SuperLink), each by process group.
    """

    def __init__(self, log_dir: Path, *, env: dict[str, str], cwd: Path | None = None) -> None:
        self.log_dir = log_dir
        self.env = env
        self.cwd = cwd
        self.procs: dict[str, Managed] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str]) -> Managed:
        """Start ``argv`` in a new session; stdout and stderr go to ``<log_dir>/<name>.log``.

        Raises
        ------
        FederationError
            If a process of that name is already running.

        """
        if name in self.procs and self.procs[name].alive():
            raise FederationError(f"{name} is already running (pid {self.procs[name].pid})")
        log_file = self.log_dir / f"{name}.log"
        with log_file.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        managed = Managed(name, proc, log_file)
        self.procs[name] = managed
        log.debug("started %s (pid %d, log %s)", name, proc.pid, log_file)
        return managed

    def stop(self, name: str, *, grace: float = 10.0) -> None:
        """Stop one process (and its group) by name."""
        managed = self.procs.get(name)
        if managed is not None:
            stop_process(managed.proc, name=name, grace=grace)

    def kill(self, name: str) -> None:
        """SIGKILL one process group at once (simulates a crashed site)."""
        managed = self.procs[name]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(managed.pid, signal.SIGKILL)
        managed.proc.wait(timeout=10)

    def stop_all(self) -> None:
        """Stop every process, newest first; never raises for one that is already gone."""
        for name in reversed(list(self.procs)):
            try:
                self.stop(name, grace=5.0)
            except Exception:  # keep stopping the others
                log.exception("could not stop %s", name)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into ``KeyboardInterrupt`` inside the block, so cleanup runs.

    Only installs the handler in the main thread (signals cannot be set elsewhere).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stream_command(
    cmd: Sequence[str],
    *,
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    timeout: float,
) -> int:
    """Run ``cmd``, tee its output lines to ``log_path`` and ``on_line``; return its exit code.

    Returns -1 if the command had to be stopped. ``flwr run --stream`` returns once the
    run has finished; a watchdog stops it after ``timeout`` seconds so a run that hangs
    (e.g. a site that never connects) cannot block forever. The command's process group
    is always stopped on the way out.
    """
    with log_path.open("w") as log_fh:
        proc = subprocess.Popen(
            list(cmd),
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        name = Path(cmd[0]).name
        watchdog = threading.Timer(timeout, stop_process, args=(proc,), kwargs={"name": name})
        watchdog.start()
        try:
            for raw in proc.stdout or ():
                line = raw.decode(errors="replace").rstrip()
                log_fh.write(line + "\n")
                log_fh.flush()
                if on_line:
                    on_line(line)
            proc.wait()
        finally:
            watchdog.cancel()
            stop_process(proc, name=name, grace=5.0)
    return proc.returncode if proc.returncode is not None else -1
