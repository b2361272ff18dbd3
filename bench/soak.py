"""Soak: does any long-lived process grow over a long run? (issue 14, item 2)

Two phases in one invocation, 3 hospitals, the demo CNN on a tiny PneumoniaMNIST subset
(``--images-per-site`` training images each), DP-SGD on:

1. ``simulation``: ``medfed simulate`` for ``--sim-rounds`` rounds (Flower's simulation
   engine: a ``--simulation`` SuperLink, its ``flwr-simulation`` process, which runs the
   ServerApp and is the Ray driver, and the Ray processes: GCS, raylet, the workers that
   host the ClientApp actors), SecAgg+ on.
2. ``deployment``: the real processes of ``medfed deploy-local`` (simulation/launch/deploy.py:
   SuperLink with TLS and node authentication, the ServerApp SuperExec and its
   ``flwr-serverapp``, per hospital a site worker, a SuperNode and a ClientApp SuperExec)
   for ``--deploy-rounds`` rounds, SecAgg+ off (its four exchanges per round would each pay
   Flower's pull interval; a deployment round already costs ~13 s).

Every process the phase starts is found by walking ``/proc`` from this process and its
resident set size (RSS, ``/proc/PID/statm``) is sampled every ``--interval`` s. The round
a sample belongs to is the last round in the run's round log (``rounds.jsonl``) at that
moment. Per process and round, the JSON keeps the highest RSS sampled while that many
rounds had completed; ``growth_pct`` is ``rss(last round) / rss(round 20) - 1`` for every
process alive from round 20 to the end (processes that live for one message, such as a
deployment ``flwr-clientapp``, are listed apart). Target: <= 10 % for each process.

Usage: ``python bench/soak.py [--sim-rounds 200] [--deploy-rounds 50] [--quick]``
(``--quick``: 25 + 22 rounds, about 6 minutes). Writes ``bench/results/soak.json``
(``--out`` to change). Every process started is stopped when the phase ends, on error or
Ctrl-C; a leftover descendant is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/soak.py` from anywhere
    sys.path.insert(0, str(ROOT))

OUT = Path(__file__).resolve().parent / "results" / "soak.json"
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
BASELINE_ROUND = 20
TARGET_GROWTH_PCT = 10.0
GRACE_SECONDS = 20.0

log = logging.getLogger("soak")


# ----------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Proc:
    """One process as ``/proc`` shows it."""

    pid: int
    ppid: int
    start: int  # clock ticks after boot: (pid, start) names a process uniquely
    rss: int  # bytes
    cmdline: tuple[str, ...]


def read_proc(pid: int) -> Proc | None:
    """Read one process from ``/proc``; None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    cmd = tuple(a for a in raw.decode(errors="replace").split("\0") if a)
    return Proc(pid, int(fields[1]), int(fields[19]), int(statm[1]) * PAGE, cmd)


def read_pss(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (``/proc/PID/smaps_rollup``); 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(root: int) -> dict[int, Proc]:
    """Every live descendant of ``root`` (not ``root`` itself), by pid."""
    procs = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (p := read_proc(int(entry.name))) is not None:
            procs[p.pid] = p
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = procs[pid]
        todo.extend(children.get(pid, []))
    return out


#: (substring of the command line, role), first match wins.
ROLES = (
    ("flower-superlink", "superlink"),
    ("flwr-simulation", "flwr-simulation (ServerApp + Ray driver)"),
    ("flwr-serverapp", "flwr-serverapp (ServerApp)"),
    ("flwr-clientapp", "flwr-clientapp (one per message)"),
    ("flower-supernode", "supernode"),
    ("site serve", "site-worker"),
    ("gcs_server", "ray-gcs"),
    ("raylet", "raylet"),
    ("dashboard_agent", "ray-dashboard-agent"),
    ("dashboard/dashboard.py", "ray-dashboard"),
    ("runtime_env/agent", "ray-runtime-env-agent"),
    ("log_monitor", "ray-log-monitor"),
    ("monitor.py", "ray-monitor"),
    ("ray::", "ray-worker"),
    ("default_worker.py", "ray-worker"),
    ("flwr run", "flwr-run (CLI)"),
    ("medfed simulate", "medfed-simulate (CLI)"),
)


def role_of(cmd: tuple[str, ...]) -> str:
    """A readable role for a command line (see :data:`ROLES`)."""
    line = " ".join(Path(cmd[0]).name if i == 0 else a for i, a in enumerate(cmd)) if cmd else ""
    if "flower-superexec" in line:
        kind = next((k for k in ("serverapp", "clientapp") if k in line), "simulation")
        return f"superexec-{kind}"
    for needle, role in ROLES:
        if needle in line:
            if role == "ray-worker" and cmd and cmd[0].startswith("ray::"):
                return "ray-worker " + cmd[0].split(".")[0].removeprefix("ray::")
            return role
    return Path(cmd[0]).name if cmd else "?"


# ----------------------------------------------------------------------------- sampler


@dataclass
class Series:
    """The RSS of one process over the rounds."""

    pid: int
    start: int
    role: str
    name: str
    first_round: int
    last_round: int = 0
    by_round: dict[int, int] = field(default_factory=dict)  # round -> max RSS bytes
    peak: int = 0


class TreeSampler:
    """Sample the RSS of every descendant of this process in a background thread.

    Parameters
    ----------
    current_round : callable
        Returns the number of rounds completed so far (from the run's round log).
    names : callable, optional
        pid -> name for processes the caller started itself (e.g. ``supernode-2``).
    interval : float
        Seconds between samples.
    pss : bool
        Also sum the proportional set sizes (slower: reads ``smaps_rollup``).

    """

    def __init__(
        self,
        current_round: Callable[[], int],
        *,
        names: Callable[[int], str | None] | None = None,
        interval: float = 0.5,
        pss: bool = False,
    ) -> None:
        self.current_round = current_round
        self.pss = pss
        self.peak_total_pss = 0
        self.names = names or (lambda pid: None)
        self.interval = interval
        self.series: dict[tuple[int, int], Series] = {}
        self.peak_total = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> int:
        """Take one sample now; return the summed RSS of the tree (bytes)."""
        rnd = self.current_round()
        tree = process_tree(os.getpid())
        total = 0
        for p in tree.values():
            total += p.rss
            key = (p.pid, p.start)
            s = self.series.get(key)
            role = role_of(p.cmdline)
            # a process is named by the caller (supernode-2), or after the nearest ancestor
            # the caller named (the SuperExec of supernode-2 -> its flwr-clientapp)
            name, anc = self.names(p.pid), tree.get(p.ppid)
            while name is None and anc is not None:
                if (n := self.names(anc.pid)) is not None:
                    name = f"{role} (under {n})"
                anc = tree.get(anc.ppid)
            if s is None:
                s = Series(p.pid, p.start, role, name or role, first_round=rnd)
                self.series[key] = s
            elif role != "?" and not (role == "ray-worker" and s.role.startswith("ray-worker ")):
                # a Ray worker keeps the name of the actor it hosted once; an exiting
                # process (empty command line) keeps its name
                s.role, s.name = role, name or role
            s.last_round = rnd
            s.by_round[rnd] = max(s.by_round.get(rnd, 0), p.rss)
            s.peak = max(s.peak, p.rss)
        self.peak_total = max(self.peak_total, total)
        if self.pss:
            self.peak_total_pss = max(self.peak_total_pss, sum(map(read_pss, tree)))
        self.samples += 1
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a sampler must never take the benchmark down
                log.exception("RSS sample failed")

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def seen(self) -> list[tuple[int, int]]:
        """(pid, start time) of every process ever sampled."""
        return list(self.series)


def rounds_completed(run_dir: Path) -> Callable[[], int]:
    """A function returning the last round in ``run_dir/rounds.jsonl`` (0 before any)."""
    path = run_dir / "rounds.jsonl"

    def current() -> int:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return 0
        for line in reversed(lines):
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                return int(json.loads(line)["round"])
        return 0

    return current


def round_times(run_dir: Path) -> dict[str, float]:
    """Median and maximum of the round log's ``wall-seconds`` (rounds >= 1)."""
    walls = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "rounds.jsonl").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, ValueError):
                r = json.loads(line)
                if int(r["round"]) > 0:
                    walls.append(float(r["wall-seconds"]))
    if not walls:
        return {}
    return {
        "median_round_wall_seconds": round(statistics.median(walls), 2),
        "max_round_wall_seconds": round(max(walls), 2),
    }


def wait_for_rounds(run_dir: Path, rounds: int, *, stall: float) -> int:
    """Wait until the round log reaches ``rounds`` and ``final_model.pt`` exists.

    Returns 0 then, or 1 once no round has finished for ``stall`` seconds.
    """
    current = rounds_completed(run_dir)
    last, since = current(), time.monotonic()
    while not (current() >= rounds and (run_dir / "final_model.pt").exists()):
        if (now := current()) != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            return 1
        time.sleep(2.0)
    return 0


def kill_leftovers(seen: list[tuple[int, int]]) -> list[str]:
    """SIGKILL every sampled process that is still alive (same pid AND start time)."""
    left = []
    for pid, start in seen:
        p = read_proc(pid)
        if p is not None and p.start == start:
            left.append(f"{pid} {' '.join(p.cmdline)[:120]}")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return left


def summarise(
    sampler: TreeSampler, *, final_round: int, baseline: int = BASELINE_ROUND
) -> dict[str, Any]:
    """Per-process RSS series (MiB per round) and growth from round 20 to the end."""
    long_lived, transient = [], {}
    for s in sorted(sampler.series.values(), key=lambda s: (s.name, s.pid)):
        series = {r: round(v / MIB, 1) for r, v in sorted(s.by_round.items())}
        spans = s.first_round <= baseline and s.last_round >= final_round - 1
        if not spans:  # lived for part of the run only (one message, a Ray idle worker)
            t = transient.setdefault(s.role, {"count": 0, "peak_rss_mb": 0.0})
            t["count"] += 1
            t["peak_rss_mb"] = max(t["peak_rss_mb"], round(s.peak / MIB, 1))
            continue
        base_round = min((r for r in series if r >= baseline), default=None)
        base = series.get(base_round) if base_round is not None else None
        end = series[max(series)]
        growth = None if not base else round(100.0 * (end - base) / base, 2)
        long_lived.append(
            {
                "name": s.name,
                "role": s.role,
                "pid": s.pid,
                "rss_mb_first": series[min(series)],
                "rss_mb_at_baseline": base,
                "rss_mb_end": end,
                "peak_rss_mb": round(s.peak / MIB, 1),
                "growth_pct": growth,
                "within_target": growth is not None and growth <= TARGET_GROWTH_PCT,
                "rss_mb_by_round": series,
            }
        )
    return {
        "rounds_completed": final_round,
        "samples": sampler.samples,
        "peak_tree_rss_mb": round(sampler.peak_total / MIB, 1),
        "processes": long_lived,
        "short_lived_processes": transient,
        "max_growth_pct": max((p["growth_pct"] or 0.0 for p in long_lived), default=None),
        "all_within_target": all(p["within_target"] for p in long_lived),
    }


# ----------------------------------------------------------------------------- data


def tiny_data_root(npz: Path, out: Path, *, images_per_site: int, sites: int, seed: int) -> Path:
    """Write ``out/pneumoniamnist/pneumoniamnist.npz``: a seeded subset of ``npz``.

    Returns the data root (``--data-dir`` of ``medfed simulate``).
    """
    rng = np.random.default_rng(seed)
    dst = out / "pneumoniamnist" / "pneumoniamnist.npz"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with np.load(npz) as z:
        data = {k: z[k] for k in z.files}
    subset = {}
    for split, n in {"train": images_per_site * sites, "val": 64, "test": 64}.items():
        if f"{split}_labels" not in data:
            continue
        labels = data[f"{split}_labels"].reshape(-1)
        idx = np.sort(rng.choice(labels.size, size=min(n, labels.size), replace=False))
        subset[f"{split}_images"] = data[f"{split}_images"][idx]
        subset[f"{split}_labels"] = data[f"{split}_labels"][idx]
    np.savez(dst, **subset)  # type: ignore[arg-type]
    return out


# ----------------------------------------------------------------------------- phases


def bench_env() -> dict[str, str]:
    """Environment for ``medfed simulate``: Ray's OOM killer off unless the caller sets it.

    On a machine shared with other work, Ray's memory monitor kills a ClientApp actor when
    the *machine* passes 95 % memory, whoever uses it; the benchmark measures memory
    itself, so the monitor (``RAY_memory_monitor_refresh_ms=0``) is off by default. Ray
    also gives its workers ``oom_score_adj`` 1000, so when another program exhausts the
    machine's memory the kernel kills a ClientApp actor first (seen here: a 20 GB process
    of other work; the actor had 0.4 GB): ``RAY_worker_oom_score_adjustment=0``.
    """
    return {
        "RAY_memory_monitor_refresh_ms": "0",
        "RAY_worker_oom_score_adjustment": "0",
        **os.environ,
        "COLUMNS": "200",
    }


@contextlib.contextmanager
def sampled(sampler: TreeSampler) -> Iterator[TreeSampler]:
    """Run ``sampler`` in the block; afterwards kill any descendant it saw still alive."""
    try:
        with sampler:
            yield sampler
    finally:
        # flwr-simulation (its own session) leaves ~0.2 s after the SuperLink stops
        # (flwr/supercore/app_utils.py, start_parent_process_monitor), then stops Ray:
        # give them GRACE_SECONDS before killing whatever is left
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline and any(
            (p := read_proc(pid)) is not None and p.start == start for pid, start in sampler.seen()
        ):
            time.sleep(0.5)
        if left := kill_leftovers(sampler.seen()):
            log.warning("killed %d leftover processes: %s", len(left), left)


def simulation_phase(
    root: Path,
    npz: Path,
    *,
    rounds: int,
    images_per_site: int,
    interval: float,
    secagg: bool,
    baseline: int,
) -> dict[str, Any]:
    """``medfed simulate`` with 3 sites for ``rounds`` rounds, sampled."""
    data_root = tiny_data_root(npz, root / "sim-data", images_per_site=images_per_site, sites=3,
                               seed=42)  # fmt: skip
    run_dir = root / "sim-run"
    cmd = [
        str(Path(sys.executable).parent / "medfed"), "simulate", "--sites", "3",
        "--partition", "iid", "--rounds", str(rounds), "--data-dir", str(data_root),
        "--run-dir", str(run_dir), "--set", "batch-size=32",
        "--set", f"secagg.enabled={str(secagg).lower()}", "--set", "dp.enabled=true",
        "--timeout", str(max(1800, rounds * 30)),
    ]  # fmt: skip
    started = time.perf_counter()
    sampler = TreeSampler(rounds_completed(run_dir), interval=interval)
    with sampled(sampler), (root / "simulate.log").open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=bench_env())  # fmt: skip
        interrupted = False
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # stopped early: report the rounds so far
            interrupted, code = True, -2
        finally:
            if proc.poll() is None:  # SIGTERM lets medfed stop its SuperLink
                proc.terminate()
                proc.wait(timeout=120)
    seconds = time.perf_counter() - started
    final = rounds_completed(run_dir)()
    error = None
    if not interrupted and (code != 0 or final < rounds):
        tail = (root / "simulate.log").read_text()[-3000:]
        error = f"exit {code} after {final} rounds: ...{tail[-1500:]}"
        log.error("simulation phase failed: %s", tail)
    if final <= baseline:
        raise SystemExit(f"simulation phase: {final} rounds, none after round {baseline}")
    return {
        "error": error,
        "engine": "Flower simulation (Ray), medfed simulate",
        "secagg": secagg,
        "rounds_planned": rounds,
        "interrupted": interrupted,
        "wall_seconds": round(seconds, 1),
        **round_times(run_dir),
        **summarise(sampler, final_round=final, baseline=baseline),
    }


def deployment_phase(
    root: Path, npz: Path, *, rounds: int, images_per_site: int, interval: float, baseline: int
) -> dict[str, Any]:
    """The processes of ``medfed deploy-local`` (TLS, node auth) for ``rounds`` rounds."""
    from simulation.launch.deploy import (
        default_run_config,
        local_federation,
        prepare_credentials,
        prepare_policies,
        prepare_site_datasets,
    )

    deploy_dir = root / "deploy"
    prepare_credentials(deploy_dir, num_sites=3)
    prepare_site_datasets(
        npz, deploy_dir, num_sites=3, images_per_site=images_per_site, source="virtual"
    )
    prepare_policies(
        deploy_dir, num_sites=3, overrides={"require_secagg": False, "max_rounds": max(rounds, 100)}
    )
    run_dir = deploy_dir / "run"
    cfg = default_run_config(
        deploy_dir,
        run_dir,
        **{
            "num-server-rounds": rounds,
            "min-sites": 3,
            "min-replies": 3,
            "secagg.enabled": False,
            "dp.enabled": True,
            "batch-size": 32,
        },
    )
    started = time.perf_counter()
    pid_names: dict[int, str] = {}
    sampler = TreeSampler(rounds_completed(run_dir), names=pid_names.get, interval=interval)
    interrupted = False
    # a generous start-up timeout: on a loaded machine `flwr supernode list` is slow
    with sampled(sampler), local_federation(deploy_dir, startup_timeout=600) as fed:
        pid_names.update({m.pid: name for name, m in fed.group.procs.items()})
        up = time.perf_counter() - started
        log.warning("deployment: federation up in %.1f s; %d rounds", up, rounds)
        run_started = time.perf_counter()
        try:
            code = fed.run(cfg, timeout=max(1800, rounds * 60))
            if rounds_completed(run_dir)() < rounds:
                # `flwr run --stream` can end early (an HTTP error of its log stream on a
                # loaded machine) while the SuperLink goes on with the run: wait for it
                log.warning("flwr run ended (exit %d) before the last round; waiting", code)
                code = wait_for_rounds(run_dir, rounds, stall=600.0) or code
        except KeyboardInterrupt:  # stopped early: report the rounds so far
            interrupted, code = True, -2
        seconds = time.perf_counter() - run_started
        sampler.sample()  # the last round, before the processes stop
    final = rounds_completed(run_dir)()
    error = None
    if not interrupted and (code != 0 or final < rounds):
        kept = Path(tempfile.mkdtemp(prefix="medfed-soak-logs-"))
        shutil.copytree(fed.group.log_dir, kept, dirs_exist_ok=True)
        tail = (fed.group.log_dir / "flwr-run.log").read_text()[-1500:]
        error = f"exit {code} after {final} rounds (logs kept in {kept}): ...{tail}"
        log.error("deployment phase failed: %s", error)
    if final <= baseline:
        raise SystemExit(f"deployment phase: {final} rounds, none after round {baseline}")
    return {
        "error": error,
        "engine": "Flower deployment (medfed deploy-local processes: TLS, node auth)",
        "secagg": False,
        "rounds_planned": rounds,
        "interrupted": interrupted,
        "startup_seconds": round(up, 1),
        "wall_seconds": round(seconds, 1),
        **round_times(run_dir),
        **summarise(sampler, final_round=final, baseline=baseline),
    }


def run_phase(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one phase in this process (its processes are this process's descendants)."""
    from simulation.data.datasets import medmnist_path

    npz = medmnist_path("pneumoniamnist")
    with tempfile.TemporaryDirectory(prefix=f"medfed-soak-{name}-") as tmp:
        if name == "simulation":
            return simulation_phase(
                Path(tmp), npz, rounds=args.sim_rounds, images_per_site=args.images_per_site,
                interval=args.interval, secagg=args.sim_secagg, baseline=args.baseline_round,
            )  # fmt: skip
        if name == "deployment":
            return deployment_phase(
                Path(tmp), npz, rounds=args.deploy_rounds, images_per_site=args.images_per_site,
                interval=args.interval, baseline=args.baseline_round,
            )  # fmt: skip
    raise SystemExit(f"unknown phase {name!r}: simulation or deployment")


def run_phases_in_parallel(phases: list[str], argv: list[str]) -> dict[str, Any]:
    """Run each phase as its own ``soak.py --phases NAME`` process at once; merge their JSON.

    Each child samples only its own descendants, so the phases' processes never mix. A
    deployment round mostly waits on Flower's pull intervals, so the phases overlap well.
    """
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medfed-soak-parts-") as tmp:
        children = {}
        for name in phases:
            part = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--phases", name,
                   "--sequential", "--out", str(part)]  # fmt: skip
            children[name] = (subprocess.Popen(cmd), part)
        try:
            try:
                for proc, _ in children.values():
                    proc.wait()
            except KeyboardInterrupt:  # each child reports the rounds it finished
                for proc, _ in children.values():
                    proc.send_signal(signal.SIGINT)
                for proc, _ in children.values():
                    proc.wait(timeout=300)
            for name, (proc, part) in children.items():
                if part.exists():  # a phase that failed after round 20 still reports
                    out[name] = json.loads(part.read_text())["phases"][name]
                else:
                    out[name] = {"error": f"exit {proc.returncode}, no result", "processes": []}
        finally:
            for proc, _ in children.values():
                if proc.poll() is None:  # Ctrl-C / failure: the child stops its processes
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim-rounds", type=int, default=200)
    ap.add_argument("--deploy-rounds", type=int, default=50)
    ap.add_argument("--rounds", type=int, help="the same number of rounds for both phases")
    ap.add_argument("--quick", action="store_true", help="25 + 22 rounds: a short check")
    ap.add_argument("--images-per-site", type=int, default=32)
    ap.add_argument(
        "--sim-secagg",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SecAgg+ in the simulation phase (4 exchanges per round: about 3x slower)",
    )
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between samples")
    ap.add_argument("--phases", default="simulation,deployment")
    ap.add_argument(
        "--sequential", action="store_true", help="one phase after the other (default: at once)"
    )
    ap.add_argument(
        "--baseline-round", type=int, default=BASELINE_ROUND, help="growth is from this round"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--update",
        action="store_true",
        help="keep the other phases already in --out (rerun one phase with --phases NAME)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # started in the background (`cmd &`), SIGINT is ignored: make Ctrl-C / kill -INT stop
    # the run cleanly (and report the rounds so far) wherever it was started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.quick:
        args.sim_rounds, args.deploy_rounds = 25, 22
    if args.rounds:
        args.sim_rounds = args.deploy_rounds = args.rounds
    if min(args.sim_rounds, args.deploy_rounds) <= args.baseline_round:
        raise SystemExit(f"growth is measured from round {args.baseline_round}: run more rounds")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    result: dict[str, Any] = {
        "benchmark": "soak",
        "sites": 3,
        "model": "cnn",
        "images_per_site": args.images_per_site,
        "dp": True,
        "phases_ran": "sequentially" if args.sequential or len(phases) == 1 else "at once",
        "sample_interval_seconds": args.interval,
        "baseline_round": args.baseline_round,
        "growth": "rss(last round) / rss(baseline round) - 1; rss(r) = highest RSS sampled while "
        "r rounds had completed",
        "targets": {"growth_pct_per_process": TARGET_GROWTH_PCT},
        "phases": {},
    }
    started = time.perf_counter()
    if args.sequential or len(phases) == 1:
        for name in phases:
            log.warning("%s phase", name)
            result["phases"][name] = run_phase(name, args)
    else:
        argv = [
            "--sim-rounds", str(args.sim_rounds), "--deploy-rounds", str(args.deploy_rounds),
            "--images-per-site", str(args.images_per_site), "--interval", str(args.interval),
            "--sim-secagg" if args.sim_secagg else "--no-sim-secagg",
            "--baseline-round", str(args.baseline_round),
        ]  # fmt: skip
        log.warning("phases %s at once", phases)
        result["phases"] = run_phases_in_parallel(phases, argv)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.update and args.out.exists():
        previous = json.loads(args.out.read_text())
        kept = {k: v for k, v in previous.get("phases", {}).items() if k not in phases}
        result["phases"] = {**kept, **result["phases"]}
        result["phases_ran"] = f"{', '.join(phases)} rerun; {', '.join(kept)} from an earlier run"
    phases_ok = all(not p.get("error") for p in result["phases"].values())
    result["all_within_target"] = phases_ok and all(
        p["all_within_target"] for p in result["phases"].values()
    )
    result["load_average_1min"] = os.getloadavg()[0]
    result["cpus"] = os.cpu_count()
    result["python"] = platform.python_version()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, phase in result["phases"].items():
        for p in phase["processes"]:
            log.warning(
                "%s %-45s %7.1f -> %7.1f MiB (%+.1f %%)", name, p["name"],
                p["rss_mb_at_baseline"] or 0, p["rss_mb_end"], p["growth_pct"] or 0,
            )  # fmt: skip
    log.warning("wrote %s", args.out)
    if not phases_ok:
        raise SystemExit("a phase failed; see 'error' in " + str(args.out))


if __name__ == "__main__":
    main()
