"""Centralised ("pooled") baseline: one model trained on the union of the sites' data.

The reference a federated run is compared with at equal compute: every training example
is seen ``num-server-rounds x local-epochs`` times in both, with the same model, loss
(the task's), optimiser, batch size and learning rate. The loop is client/train.py's
``train_epochs``; nothing here is a copy of it. Without DP only (the federated DP runs
are compared with it and with the federated non-DP run).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from client.train import TrainStats, make_optimizer, make_train_loader, train_epochs
from common.cli import fail
from common.config import RunConfig
from common.models import get_model
from common.site_dataset import SiteDataset, SplitArrays
from common.tasks import get_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PooledResult:
    """Metrics of the pooled model on the evaluation split, and what it trained on."""

    metrics: dict[str, float]
    train_examples: int
    epochs: int
    seconds: float


def pool_splits(site_dirs: Sequence[Path], split: str = "train") -> SplitArrays:
    """Concatenate one split of several site datasets (in memory).

    Raises
    ------
    DataError
        If a site lacks ``split`` (from :meth:`SiteDataset.load`).

    """
    parts = [SiteDataset(d).load(split, mmap=False) for d in site_dirs]
    return SplitArrays.create(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.groups for p in parts]),
    )


def train_centralised(
    split: SplitArrays,
    run: RunConfig,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    amp: bool = False,
) -> tuple[torch.nn.Module, TrainStats]:
    """Train a fresh model on ``split`` for ``epochs`` epochs with the run's optimiser.

    The one central-training function of medfed: the pooled baseline (:func:`train_pooled`,
    ``medfed pooled-baseline``) and the experiment's pooled and local baselines
    (simulation/research/experiment.py) all train through it. The loop is client/train.py's
    ``train_epochs`` (no DP: baselines are the non-private reference), the model is
    initialised with ``torch.manual_seed(seed)`` exactly as the federated run's global
    model, and batches are drawn with a generator seeded by ``seed``.

    Parameters
    ----------
    split : SplitArrays
        The training examples, images ``(N, C, H, W)``.
    run : RunConfig
        Model, task (its loss), batch size, learning rate, momentum, weight decay; DP
        settings are ignored.
    epochs : int
        Passes over ``split``.
    seed : int
        Seeds the model's initialisation and the batch order.
    device : torch.device
        Where to train.
    amp : bool
        Mixed precision (CUDA only), as in :func:`client.train.train_epochs`.

    Returns
    -------
    tuple[torch.nn.Module, TrainStats]
        The trained model and what the loop did (loss, steps, seconds).

    """
    torch.manual_seed(seed)
    model = get_model(run.model, **run.model_kwargs()).to(device)
    loader = make_train_loader(
        split, batch_size=run.train.batch_size, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = make_optimizer(
        model,
        learning_rate=run.train.learning_rate,
        momentum=run.train.momentum,
        weight_decay=run.train.weight_decay,
    )
    stats = train_epochs(
        model,
        loader,
        optimizer=optimizer,
        epochs=epochs,
        device=device,
        criterion=get_task(run.task).make_loss(),
        amp=amp,
    )
    return model, stats


def train_pooled(
    site_dirs: Sequence[Path],
    eval_dir: Path,
    *,
    run: RunConfig,
    device: torch.device,
) -> PooledResult:
    """Train ``run.model`` on the pooled ``train`` splits; evaluate on ``eval_dir``'s val.

    Parameters
    ----------
    site_dirs : Sequence[pathlib.Path]
        The site datasets of a simulation (``<run>/sites/site-*``).
    eval_dir : pathlib.Path
        The held-out site dataset (``<run>/sites/global-val``).
    run : RunConfig
        Model, task, batch size, learning rate, momentum, weight decay, seed; epochs =
        ``num_server_rounds * local_epochs``. DP settings are ignored.
    device : torch.device
        Where to train.

    Returns
    -------
    PooledResult

    """
    train = pool_splits(site_dirs)
    epochs = run.num_server_rounds * run.train.local_epochs
    model, stats = train_centralised(
        train, run, epochs=epochs, seed=run.seed, device=device, amp=run.train.amp
    )
    val = SiteDataset(eval_dir).load("val")
    metrics = get_task(run.task).evaluate(
        model, val.images, val.labels, batch_size=run.evaluation.batch_size, device=device
    )
    log.info("pooled %s: %d epochs on %d examples: %s", run.model, epochs, len(train), metrics)
    return PooledResult(metrics, len(train), epochs, stats.seconds)


def pooled_baseline(
    run_dir: Annotated[
        Path, typer.Option(help="A finished `medfed simulate` run directory (its sites/).")
    ],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Train the run's model centrally on all its sites' training data, at equal compute.

    Reads the run's config.json (model, task, batch size, learning rate, rounds x local
    epochs) and sites/, trains without DP on the pooled training splits, evaluates on
    sites/global-val and prints JSON. For CHASE_DB1 runs it adds the second human
    observer's agreement with the first on the same held-out children.
    """
    import json
    import sys

    from common.device import resolve_device
    from common.errors import MedfedError
    from simulation.data.chase import DATASET as CHASE
    from simulation.data.chase import ChasePlan, inter_observer_metrics
    from simulation.data.datasets import resolve_data_dir
    from simulation.data.sites import GLOBAL_EVAL

    try:
        raw = json.loads((run_dir / "config.json").read_text())
        run = RunConfig.from_run_config(raw).override({"dp.enabled": False, "amp": False})
        sites_dir = run_dir / "sites"
        site_dirs = sorted(sites_dir.glob("site-*"), key=lambda p: int(p.name.split("-")[1]))
        result = train_pooled(
            site_dirs, sites_dir / GLOBAL_EVAL, run=run, device=resolve_device(device)
        )
        out: dict[str, object] = {
            "run-dir": str(run_dir),
            "model": run.model,
            "epochs": result.epochs,
            "train-examples": result.train_examples,
            "train-seconds": round(result.seconds, 1),
            "pooled": result.metrics,
        }
        prov = SiteDataset(site_dirs[0]).manifest["provenance"]
        if prov.get("source") == CHASE:
            plan = ChasePlan(
                num_sites=int(prov["num-sites"]),
                seed=int(prov["seed"]),
                size=SiteDataset(sites_dir / GLOBAL_EVAL).image_shape[-1],
            )
            out["inter-observer"] = inter_observer_metrics(resolve_data_dir(None), plan=plan)
    except (MedfedError, OSError) as exc:
        raise fail(exc) from None
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
