"""Scale: 10, 50 and 100 virtual hospitals on one machine (issue 14, item 3).

For each federation size N, ``medfed simulate --sites N`` (Flower's simulation engine on
a local Ray instance with this machine's cores, 1 CPU per virtual site, so Ray runs one
ClientApp actor per core whatever N is) trains the demo CNN with DP-SGD on the same
number of PneumoniaMNIST images per site (``--images-per-site``, a seeded subset; IID), so
the work per site is constant and an ideal engine's round time grows linearly in N.

Measured per N, in one invocation:

- ``peak_tree_rss_mb``: peak of the summed RSS of the whole simulation's process tree
  (``medfed simulate``, the SuperLink, ``flwr-simulation`` = ServerApp + Ray driver, Ray's
  GCS, raylet, agents and workers), sampled every ``--interval`` s from ``/proc``. RSS
  counts pages shared between processes once per process, so it over-states;
  ``peak_tree_pss_mb`` (proportional set size, ``/proc/PID/smaps_rollup``) counts each
  shared page once, split between its users.
- ``seconds_per_round``: median of the round log's ``wall-seconds`` over rounds 2..R
  (round 1 also pays the Ray actors' first imports).

and across sizes: memory per site = (peak(N_max) - peak(N_min)) / (N_max - N_min), the
ratios of seconds per round and of N to the smallest size, and
``round_time_growth_over_linear`` = (seconds ratio) / (N ratio), <= 1 when rounds grow
at most linearly. Targets: 100 sites in <= 4096 MiB; growth at most linear. The load
average is recorded: on a shared 2-core machine round times move with it.

Usage: ``python bench/scale.py [--sites 10,50,100] [--rounds 3] [--images-per-site 32]``
Writes ``bench/results/scale.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from soak import (  # bench/soak.py: the /proc sampler and the tiny data subset
    MIB,
    ROOT,
    TreeSampler,
    bench_env,
    rounds_completed,
    sampled,
    tiny_data_root,
)

OUT = Path(__file__).resolve().parent / "results" / "scale.json"
TARGET_MB_100 = 4096
RAY_START_ATTEMPTS = 3
RAY_START_FAILED = "timed out during startup"

log = logging.getLogger("scale")


def run_size(
    root: Path, npz: Path, *, sites: int, rounds: int, images_per_site: int, args: Any
) -> dict[str, Any]:
    """Run ``medfed simulate --sites N`` under the sampler; return its figures."""
    data_root = tiny_data_root(
        npz, root / f"data-{sites}", images_per_site=images_per_site, sites=sites, seed=42
    )
    run_dir = root / f"run-{sites}"
    cmd = [
        str(Path(sys.executable).parent / "medfed"), "simulate", "--sites", str(sites),
        "--partition", "iid", "--rounds", str(rounds), "--data-dir", str(data_root),
        "--run-dir", str(run_dir), "--set", f"batch-size={args.batch_size}",
        "--set", f"secagg.enabled={'true' if args.secagg else 'false'}",
        "--set", f"secagg.neighbours={args.neighbours}",
        "--set", f"dp.enabled={str(args.dp).lower()}", "--set", f"min-replies={sites}",
        "--set", f"round-timeout={args.timeout}",
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    interrupted = False
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        sampler = TreeSampler(rounds_completed(run_dir), interval=args.interval, pss=True)
        started = time.perf_counter()
        log_file = root / f"simulate-{sites}-{attempt}.log"
        with sampled(sampler), log_file.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=bench_env())  # fmt: skip
            try:
                code = proc.wait()
            except KeyboardInterrupt:  # stopped early: keep what was measured
                interrupted, code = True, -2
            finally:
                if proc.poll() is None:  # Ctrl-C: SIGTERM lets medfed stop its SuperLink
                    proc.terminate()
                    proc.wait(timeout=60)
        if interrupted or code == 0 or RAY_START_FAILED not in log_file.read_text():
            break
        # Ray waits a fixed 30 s for its raylet (ray/_private/node.py); a loaded machine
        # can miss that: start again (--force replaces the run directory medfed wrote)
        log.warning("%d sites: Ray did not start (attempt %d); again", sites, attempt)
        if "--force" not in cmd:
            cmd.append("--force")
    wall = time.perf_counter() - started
    rounds_file = run_dir / "rounds.jsonl"
    lines = (
        [json.loads(x) for x in rounds_file.read_text().splitlines()]
        if rounds_file.exists()
        else []
    )
    trained = [r for r in lines if r.get("round", 0) > 0]
    if not interrupted and (code != 0 or len(trained) < rounds):
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"{sites} sites: run failed (exit {code}):\n{tail}")
    walls = [float(r["wall-seconds"]) for r in trained]
    replied = [len(r["train"]["replied"]) for r in trained]
    steady = walls[1:] or walls
    per_round = round(statistics.median(steady), 2) if steady else None
    by_role: dict[str, float] = {}
    for s in sampler.series.values():
        by_role[s.role] = by_role.get(s.role, 0.0) + s.peak / MIB
    return {
        "sites": sites,
        "rounds": rounds,
        "interrupted_after_rounds": len(trained) if interrupted else None,
        "dp": args.dp,
        "sites_replied_per_round": replied,
        "round_wall_seconds": [round(w, 2) for w in walls],
        "seconds_per_round": per_round,
        "seconds_per_site_round": round(per_round / sites, 3) if per_round else None,
        "total_wall_seconds": round(wall, 1),
        "peak_tree_rss_mb": round(sampler.peak_total / MIB, 1),
        "peak_tree_pss_mb": round(sampler.peak_total_pss / MIB, 1),
        "peak_rss_mb_by_role (sum of each process's peak)": {
            k: round(v, 1) for k, v in sorted(by_role.items())
        },
        "processes_seen": len(sampler.series),
        "load_average_1min_after": os.getloadavg()[0],
    }


def summarise_runs(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The result JSON from the sizes measured so far (ratios to the smallest size)."""
    first, last = runs[0], runs[-1]
    for r in runs:
        r["sites_ratio"] = round(r["sites"] / first["sites"], 2)
        timed = r["seconds_per_round"] and first["seconds_per_round"]
        r["seconds_per_round_ratio"] = (
            round(r["seconds_per_round"] / first["seconds_per_round"], 2) if timed else None
        )
        r["round_time_growth_over_linear"] = (
            round(r["seconds_per_round_ratio"] / r["sites_ratio"], 2) if timed else None
        )
    span = last["sites"] - first["sites"]
    per_site = {
        key: round((last[key] - first[key]) / span, 2) if span else None
        for key in ("peak_tree_rss_mb", "peak_tree_pss_mb")
    }
    largest = max(runs, key=lambda r: r["sites"])
    return {
        "benchmark": "scale",
        "engine": "Flower simulation (Ray), medfed simulate; 1 CPU per virtual site",
        "model": "cnn",
        "dp": args.dp,
        "secagg": args.secagg,
        "secagg_neighbours": args.neighbours if args.secagg else None,
        "images_per_site": args.images_per_site,
        "batch_size": args.batch_size,
        "runs": runs,
        "memory_per_site_mb": {
            "rss": per_site["peak_tree_rss_mb"],
            "pss": per_site["peak_tree_pss_mb"],
        },
        "largest_federation_measured": largest["sites"],
        "largest_federation_peak_rss_mb": largest["peak_tree_rss_mb"],
        "round_time_growth_over_linear_at_largest": largest["round_time_growth_over_linear"],
        "targets": {
            "peak_mb_at_100_sites": TARGET_MB_100,
            "round_time_growth_over_linear": 1.0,
        },
        "targets_met": {
            "memory": all(r["peak_tree_rss_mb"] <= TARGET_MB_100 for r in runs),
            "at_most_linear": all(
                (r["round_time_growth_over_linear"] or 99.0) <= 1.0 for r in runs
            ),
        },
        "note": "round-time ratios are measured in this one invocation on a machine shared "
        "with other work; see load_average_1min_after per size",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="10,50,100", help="federation sizes, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images-per-site", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--secagg", action=argparse.BooleanOptionalAction, default=False, help="SecAgg+ on"
    )
    ap.add_argument(
        "--dp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="DP-SGD at every site (off: scale measures the engine; bench/dp_overhead.py "
        "measures DP's cost per step)",
    )
    ap.add_argument("--neighbours", type=int, default=0, help="SecAgg+ neighbours (0 = all)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per federation size")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # started in the background (`cmd &`), SIGINT is ignored: make Ctrl-C / kill -INT stop
    # the run cleanly (and report the rounds so far) wherever it was started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sizes = sorted({int(x) for x in args.sites.split(",") if x.strip()})

    sys.path.insert(0, str(ROOT))
    from simulation.data.datasets import medmnist_path

    npz = medmnist_path("pneumoniamnist")
    runs = []
    with tempfile.TemporaryDirectory(prefix="medfed-scale-") as tmp:
        for n in sizes:
            if runs and runs[-1].get("interrupted_after_rounds") is not None:
                break  # stopped: no further sizes
            log.warning("%d sites, %d rounds", n, args.rounds)
            runs.append(
                run_size(
                    Path(tmp),
                    npz,
                    sites=n,
                    rounds=args.rounds,
                    images_per_site=args.images_per_site,
                    args=args,
                )
            )
            log.warning(
                "%d sites: %.1f s/round, peak RSS %.0f MiB (PSS %.0f MiB)", n,
                runs[-1]["seconds_per_round"], runs[-1]["peak_tree_rss_mb"],
                runs[-1]["peak_tree_pss_mb"],
            )  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)  # after every size
            args.out.write_text(json.dumps(summarise_runs(runs, args), indent=2) + "\n")
    result = summarise_runs(runs, args)
    log.warning("wrote %s: %s", args.out, json.dumps(result["memory_per_site_mb"]))


if __name__ == "__main__":
    main()
