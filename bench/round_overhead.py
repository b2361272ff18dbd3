"""Deployment round overhead: a real local federation (TLS + node auth, 3 hospitals).

Runs ``docker-compose.yml``'s services as local processes (simulation/deploy.py) on
PneumoniaMNIST subsets and measures, per round, from the server's round log:

- ``wall_over_slowest_train``: the round's wall time (configure train -> round closed,
  including the evaluate phase) / the slowest site's local training time
  (``train-seconds`` the site reports). Target <= 1.10 for the demo model.
- ``train_phase_over_slowest_train``: the same for the train phase only (send -> last
  reply received).
- ``bytes_up_per_site_over_4p``: model bytes each site sent / (4 x number of model
  parameters), i.e. relative to raw float32. Target <= 1.05 without secure aggregation.
  (Array payload bytes as Flower serialises them; HTTP/TLS framing is not counted.)

The 1-minute load average is recorded: on a shared 2-core machine the figures move with it.

Usage: ``python bench/round_overhead.py [--rounds R] [--images-per-site N] [--no-dp]``
Writes ``bench/results/round_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from common.models import get_model
from simulation.datasets import medmnist_path
from simulation.deploy import (
    default_run_config,
    local_federation,
    prepare_credentials,
    prepare_site_datasets,
)
from simulation.summary import read_rounds

OUT = Path(__file__).resolve().parent / "results" / "round_overhead.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images-per-site", type=int, default=1000)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument(
        "--dp", action=argparse.BooleanOptionalAction, default=True, help="DP-SGD at the sites"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    npz = medmnist_path("pneumoniamnist")
    n_params = sum(p.numel() for p in get_model("cnn").parameters())
    n_state = sum(v.numel() for v in get_model("cnn").state_dict().values())
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        deploy_dir = Path(tmp)
        prepare_credentials(deploy_dir, num_sites=3)
        prepare_site_datasets(
            npz, deploy_dir, num_sites=3, images_per_site=args.images_per_site, source="virtual"
        )
        run_dir = deploy_dir / "run"
        overrides: dict[str, object] = {
            "num-server-rounds": args.rounds,
            "local-epochs": args.local_epochs,
            "min-sites": 3,
            "min-replies": 3,
            # the bytes target is for plain FedAvg; bench/secagg.py measures SecAgg+
            "secagg.enabled": False,
            "dp.enabled": args.dp,
        }
        cfg = default_run_config(deploy_dir, run_dir, **overrides)
        started = time.perf_counter()
        with local_federation(deploy_dir) as fed:
            startup = time.perf_counter() - started
            rc = fed.run(cfg, timeout=1800)
        if rc != 0:
            raise SystemExit(f"federated run failed (exit {rc})")
        rounds = [r for r in read_rounds(run_dir) if r["round"] > 0]

    per_round = []
    for r in rounds:
        train = r["train"]
        slowest = max(s["train-seconds"] for s in train["sites"].values())
        replied = len(train["replied"])
        per_round.append(
            {
                "round": r["round"],
                "wall_seconds": r["wall-seconds"],
                "train_phase_seconds": train["seconds"],
                "evaluate_phase_seconds": r["evaluate"]["seconds"],
                "slowest_site_train_seconds": round(slowest, 3),
                "wall_over_slowest_train": round(r["wall-seconds"] / slowest, 3),
                "train_phase_over_slowest_train": round(train["seconds"] / slowest, 3),
                "bytes_up_per_site": train["bytes-up"] / replied,
                "bytes_up_per_site_over_4p": round(train["bytes-up"] / replied / (4 * n_params), 4),
            }
        )
    result = {
        "benchmark": "round_overhead",
        "engine": "deployment (SuperLink + 3 SuperNodes, process isolation, TLS, node auth)",
        "model": "cnn",
        "parameters": n_params,
        "state_dict_elements": n_state,
        "images_per_site": args.images_per_site,
        "local_epochs": args.local_epochs,
        "dp": args.dp,
        "secure_aggregation": False,
        "startup_seconds": round(startup, 1),
        "rounds": per_round,
        "median_wall_over_slowest_train": sorted(p["wall_over_slowest_train"] for p in per_round)[
            len(per_round) // 2
        ],
        "max_bytes_up_per_site_over_4p": max(p["bytes_up_per_site_over_4p"] for p in per_round),
        "targets": {"wall_over_slowest_train": 1.10, "bytes_up_per_site_over_4p": 1.05},
        "load_average_1min": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
