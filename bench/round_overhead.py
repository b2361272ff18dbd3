"""Deployment round overhead: site workers against the previous in-ClientApp design.

A real local federation (``docker-compose.yml``'s services as local processes, TLS +
node authentication, 3 hospitals, PneumoniaMNIST subsets, the demo CNN) is run twice in
one invocation, with the same data and run config:

- ``workers``: today's design. Each hospital runs ``medfed site serve``; the FAB's
  ClientApp is a relay over the worker's Unix socket (torch, Opacus and the data stay
  warm in the worker).
- ``in-clientapp``: the design before issue 12. The ClientApp runs the same site service
  itself, in the fresh process Flower starts for every message, with the dataset and
  state dir in its node config (so each message pays the torch/Opacus import and the
  dataset load).

Per round, from the server's round log:

- ``overhead_seconds`` = round wall time - the slowest site's local training
  (``train-seconds`` the site reports). Target (DP on, SecAgg+ off): <= 6 s.
- ``wall_over_slowest_train`` = the same as a ratio.
- ``bytes_up_per_site_over_4p``: model bytes each site sent / (4 x parameters).

and the ratio of the designs' median overheads (``in-clientapp / workers``), measured in
this one run. A third design, ``flower-floor``, runs a ClientApp that does nothing (it
echoes the global model back at once): its overhead is what Flower's deployment engine
costs per round on this machine whatever the app does (the SuperNode's idle pull
interval, a fresh ``flwr-clientapp`` process per message, the reply's wait for the
SuperNode's next loop), so ``workers - flower-floor`` is what medfed itself adds.
``--secagg`` repeats both with SecAgg+ on (its four exchanges per round
each pay the SuperNode's pull interval). The 1-minute load average is recorded: on a
shared 2-core machine the figures move with it.

Usage: ``python bench/round_overhead.py [--rounds R] [--images-per-site N] [--secagg]``
Writes ``bench/results/round_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from common.models import get_model
from simulation.data.datasets import medmnist_path
from simulation.launch.compose import COMPOSE_FILE, PROJECT_ROOT, load_compose
from simulation.launch.deploy import (
    default_run_config,
    local_federation,
    prepare_credentials,
    prepare_policies,
    prepare_site_datasets,
)
from simulation.research.summary import read_rounds

OUT = Path(__file__).resolve().parent / "results" / "round_overhead.json"

#: The previous design's ClientApp: the site service in the per-message process.
IN_CLIENTAPP = '''"""Benchmark baseline: the ClientApp runs the site service itself (old design)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


def _handle(msg: Message, context: Context) -> Message:
    from client.site.policy import SitePolicy
    from client.site.service import SiteService

    policy = SitePolicy.load(str(context.node_config["site-policy"]))
    return SiteService(policy=policy, simulated=False).handle(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context)
'''


#: Flower's own floor: a ClientApp that does no work and replies at once.
FLOWER_FLOOR = '''"""Benchmark floor: a ClientApp that echoes the global model back."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _echo(msg: Message, metrics: dict[str, float]) -> Message:
    arrays = {k: v for k, v in msg.content.array_records.items()}
    return Message(RecordDict({**arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _echo(msg, {"num-examples": 1, "train-seconds": 0.0})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _echo(msg, {"num-examples": 1})
'''


def in_clientapp_compose(out: Path) -> Path:
    """Write a compose file for the baseline: no workers, data and state in the ClientApp."""
    compose = load_compose(COMPOSE_FILE)
    services = compose["services"]
    for name in [n for n in services if n.startswith("site-worker-")]:
        worker = services.pop(name)
        i = name.rsplit("-", 1)[1]
        node = services[f"supernode-{i}"]["command"]
        node[node.index("--node-config") + 1] = (
            f"dataset-dir='/data/hospital-{i}' state-dir='/state/hospital-{i}' "
            f"site-policy='/etc/medfed/hospital-{i}/site-policy.toml' site-id='hospital-{i}'"
        )
        services[f"superexec-clientapp-{i}"]["volumes"] = [
            v for v in worker["volumes"] if "-socket:" not in v
        ]
    out.write_text(yaml.safe_dump(compose, sort_keys=False))
    return out


def in_clientapp_app(out: Path, client_app: str = IN_CLIENTAPP) -> Path:
    """Copy the app with the baseline ClientApp (or another ``client/app.py`` source)."""
    out.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, out / name)
    for pkg in ("common", "client", "server", "simulation"):
        shutil.copytree(PROJECT_ROOT / pkg, out / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (out / "client" / "app.py").write_text(client_app)
    return out


def run_design(
    design: str, deploy_dir: Path, cfg: dict[str, object], *, compose: Path, app_dir: Path
) -> list[dict[str, Any]]:
    """Run one federated job on a fresh local federation; return its round lines."""
    started = time.perf_counter()
    with local_federation(deploy_dir, compose_file=compose) as fed:
        logging.warning("%s: federation up in %.1f s", design, time.perf_counter() - started)
        rc = fed.run(cfg, timeout=1800, app_dir=app_dir)
    if rc != 0:
        raise SystemExit(f"{design}: federated run failed (exit {rc})")
    return [r for r in read_rounds(Path(str(cfg["run-dir"]))) if r["round"] > 0]


def summarise(rounds: list[dict[str, Any]], n_params: int) -> dict[str, Any]:
    """Per-round overhead figures and their medians."""
    per_round = []
    for r in rounds:
        train = r["train"]
        seconds = [float(s["train-seconds"]) for s in train["sites"].values()]
        if not seconds:  # a failed round: keep why, measure nothing
            per_round.append(
                {"round": r["round"], "error": r.get("error"), "failed": train["failed"]}
            )
            continue
        slowest = max(max(seconds), 1e-3)  # the floor's no-op app reports 0 s
        replied = len(train["replied"])
        per_round.append(
            {
                "round": r["round"],
                "wall_seconds": r["wall-seconds"],
                "train_phase_seconds": train["seconds"],
                "evaluate_phase_seconds": r["evaluate"]["seconds"],
                "slowest_site_train_seconds": round(slowest, 3),
                "overhead_seconds": round(r["wall-seconds"] - slowest, 3),
                "wall_over_slowest_train": round(r["wall-seconds"] / slowest, 3),
                "bytes_up_per_site_over_4p": round(train["bytes-up"] / replied / (4 * n_params), 4),
            }
        )
    ok = [p for p in per_round if "overhead_seconds" in p]
    if not ok:
        raise SystemExit(f"no round completed: {per_round}")
    return {
        "rounds": per_round,
        "median_overhead_seconds": statistics.median(p["overhead_seconds"] for p in ok),
        "median_wall_over_slowest_train": statistics.median(
            p["wall_over_slowest_train"] for p in ok
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images-per-site", type=int, default=1000)
    ap.add_argument(
        "--secagg", action=argparse.BooleanOptionalAction, default=False, help="also with SecAgg+"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    npz = medmnist_path("pneumoniamnist")
    n_params = sum(p.numel() for p in get_model("cnn").parameters())
    settings = [False, True] if args.secagg else [False]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        root = Path(tmp)
        baseline_compose = in_clientapp_compose(root / "compose-in-clientapp.yml")
        baseline_app = in_clientapp_app(root / "app-in-clientapp")
        floor_app = in_clientapp_app(root / "app-flower-floor", FLOWER_FLOOR)
        for secagg in settings:
            designs = [
                ("workers", COMPOSE_FILE, PROJECT_ROOT),
                ("in-clientapp", baseline_compose, baseline_app),
            ]
            if not secagg:  # the echo app cannot speak SecAgg+
                designs.append(("flower-floor", baseline_compose, floor_app))
            for design, compose, app_dir in designs:
                label = f"{design}{'-secagg' if secagg else ''}"
                deploy_dir = root / label
                prepare_credentials(deploy_dir, num_sites=3)
                prepare_site_datasets(
                    npz,
                    deploy_dir,
                    num_sites=3,
                    images_per_site=args.images_per_site,
                    source="virtual",
                )
                prepare_policies(deploy_dir, num_sites=3, overrides={"require_secagg": secagg})
                cfg = default_run_config(
                    deploy_dir,
                    deploy_dir / "run",
                    **{
                        "num-server-rounds": args.rounds,
                        "min-sites": 3,
                        "min-replies": 3,
                        "secagg.enabled": secagg,
                        "dp.enabled": True,
                    },
                )
                rounds = run_design(label, deploy_dir, cfg, compose=compose, app_dir=app_dir)
                results[label] = summarise(rounds, n_params)
    ratios = {
        ("secagg" if secagg else "plain"): round(
            results[f"in-clientapp{'-secagg' if secagg else ''}"]["median_overhead_seconds"]
            / results[f"workers{'-secagg' if secagg else ''}"]["median_overhead_seconds"],
            2,
        )
        for secagg in settings
    }
    floor = results["flower-floor"]["median_overhead_seconds"]
    result = {
        "benchmark": "round_overhead",
        "engine": "deployment (SuperLink + 3 SuperNodes, process isolation, TLS, node auth)",
        "model": "cnn",
        "parameters": n_params,
        "images_per_site": args.images_per_site,
        "dp": True,
        "designs": results,
        "overhead_ratio_in_clientapp_over_workers": ratios,
        "flower_floor_median_overhead_seconds": floor,
        "medfed_added_median_overhead_seconds": round(
            results["workers"]["median_overhead_seconds"] - floor, 3
        ),
        "targets": {"workers_median_overhead_seconds_plain": 6.0},
        "load_average_1min": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    logging.warning("%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
