"""The research workbench's experiment driver: pooled vs local vs federated, one command.

``medfed experiment CONFIG.toml`` answers "does federation help here, by how much, at
what privacy cost?" the way FLamby (Ogier du Terrail et al., NeurIPS 2022) does: for one
task and data set, for every split, strategy, privacy setting and seed it trains

* **pooled**: one model on the union of the sites' training data (centralised upper
  reference);
* **local**: one model per site on that site's data only ("best local" = the site model
  that scores best on the evaluation sets);
* **federated**: the medfed ServerApp + ClientApps on Flower's simulation engine
  (:func:`run_federated`, the code path of ``medfed simulate``),

with the same compute: every example is visited ``rounds * local-epochs`` times in each
of the three (pooled and local train ``rounds * local-epochs`` epochs), the same seeds,
batch size, optimiser and learning rate. Pooled and local training reuse the ClientApp's
loop (client/train.py); every model is scored by the same code
(common/evaluation.py through the task registry) on the same evaluation sets.

Experiment file (TOML)::

    name = "heart-disease"
    seeds = [42, 43, 44]
    rounds = 30

    [data]
    kind = "heart"                  # or "medmnist"
    dir = "../shared/data/tabular/uci_heart_disease_4sites"
    # medmnist: dataset = "pneumoniamnist", sites = 3
    # splits = [{partition = "dirichlet", alpha = 0.1}, {partition = "iid"}]

    [run-config]                    # run-config keys for every run (kebab-case)
    model = "heart-logreg"
    task = "tabular"

    [[federated]]                   # one table per strategy x privacy setting
    label = "fedavg"
    strategy = "fedavg"             # any other key: a run-config override

Outputs in the experiment directory: ``results.csv`` / ``results.json`` (one row per
split x setting x seed, plus ``summary`` rows with mean and standard deviation over
seeds), each federated run's own run directory (for ``medfed report``), and the
baselines' per-site scores.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunConfig, flatten_tables, load_config_file
from common.device import resolve_device
from common.errors import ConfigError, MedfedError
from common.fsutil import check_replaceable, marker_kind, write_marker
from common.site_dataset import SiteDataset, SplitArrays
from common.tasks import get_task
from simulation.research.pooled import pool_splits, train_centralised

log = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
EXPERIMENT_JSON = "experiment.json"
#: Kind in an experiment directory's ownership marker (:func:`common.fsutil.write_marker`).
EXPERIMENT_KIND = "experiment"
DATA_KINDS = ("heart", "medmnist")
#: Headline metric of the tables and ratios.
METRIC = "accuracy"


@dataclass(frozen=True)
class SplitSpec:
    """One way of cutting the data into sites (``natural`` for the heart data)."""

    partition: str
    alpha: float = 0.5

    @property
    def label(self) -> str:
        """Short name, e.g. ``dirichlet-0.1``."""
        if self.partition in ("dirichlet", "quantity"):
            return f"{self.partition}-{self.alpha:g}"
        return self.partition


@dataclass(frozen=True)
class FederatedSpec:
    """One federated setting: a label and its run-config overrides (strategy, DP...)."""

    label: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class ExperimentConfig:
    """A parsed experiment file (see the module docstring).

    Raises
    ------
    ConfigError
        For a missing or invalid entry; names the key.

    """

    name: str
    seeds: list[int]
    rounds: int
    data_kind: str
    data: dict[str, Any]
    splits: list[SplitSpec]
    run_config: dict[str, Any]
    federated: list[FederatedSpec]
    cpus_per_site: int = 1
    timeout: float = 1800.0
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_toml(cls, path: Path) -> ExperimentConfig:
        """Parse and validate an experiment file.

        Raises
        ------
        ConfigError
            Unknown data kind, empty seed or federated lists, invalid run-config keys.

        """
        return cls.from_dict(load_config_file(Path(path), option="experiment file"))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a parsed TOML document (see :meth:`from_toml`)."""
        data = dict(doc.get("data", {}))
        kind = data.pop("kind", None)
        if kind not in DATA_KINDS:
            raise ConfigError(f"experiment [data] kind must be one of {list(DATA_KINDS)}")
        seeds = [int(s) for s in doc.get("seeds", [42])]
        if not seeds:
            raise ConfigError("experiment 'seeds' must list at least one seed")
        rounds = int(doc.get("rounds", 5))
        if rounds < 1:
            raise ConfigError("experiment 'rounds' must be >= 1")
        raw_splits = data.pop("splits", [{"partition": "natural"}] if kind == "heart" else [])
        splits = [SplitSpec(str(s["partition"]), float(s.get("alpha", 0.5))) for s in raw_splits]
        if not splits:
            raise ConfigError("experiment [data] splits must list at least one split")
        if kind == "heart" and any(s.partition != "natural" for s in splits):
            raise ConfigError("the heart data has a natural split only: splits = [natural]")
        run_config = flatten_tables(doc.get("run-config", {}))
        feds = []
        for i, entry in enumerate(doc.get("federated", [])):
            entry = flatten_tables(entry)
            label = str(entry.pop("label", entry.get("strategy", f"setting-{i}")))
            feds.append(FederatedSpec(label, entry))
        if not feds:
            raise ConfigError("experiment needs at least one [[federated]] setting")
        cfg = cls(
            name=str(doc.get("name", "experiment")),
            seeds=seeds,
            rounds=rounds,
            data_kind=str(kind),
            data=data,
            splits=splits,
            run_config=run_config,
            federated=feds,
            cpus_per_site=int(doc.get("cpus-per-site", 1)),
            timeout=float(doc.get("timeout", 1800.0)),
            source=dict(doc),
        )
        for fed in feds:  # fail before any training on a bad key or combination
            cfg.run_config_for(fed, seed=seeds[0], num_sites=1)
        return cfg

    def run_config_for(self, fed: FederatedSpec, *, seed: int, num_sites: int) -> RunConfig:
        """Return the validated run config of one federated run."""
        values = (
            self.run_config
            | fed.overrides
            | {
                "num-server-rounds": self.rounds,
                "seed": seed,
                "min-sites": num_sites,
                "min-replies": min(
                    int(fed.overrides.get("min-replies", self.run_config.get("min-replies", 1))),
                    num_sites,
                ),
            }
        )
        return RunConfig.from_run_config(values)


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class PreparedSplit:
    """Site datasets of one split, and the sets every model is scored on."""

    spec: SplitSpec
    sites_dir: Path
    sites: list[Path]
    eval_sets: list[Path]
    eval_dataset_dir: str


def prepare_split(cfg: ExperimentConfig, spec: SplitSpec, out: Path, *, seed: int) -> PreparedSplit:
    """Write the site datasets of one split under ``out/sites``.

    Heart: the 4 hospitals; each model is scored on every hospital's test part and the
    scores averaged (FLamby). MedMNIST: ``sites`` virtual sites cut from the training
    data; every model is scored on the official validation split (``global-val``).
    """
    sites_dir = out / "sites"
    if cfg.data_kind == "heart":
        from simulation.data.heart import create_heart_sites

        data_dir = Path(str(cfg.data.get("dir", "../shared/data/tabular/uci_heart_disease_4sites")))
        manifests = create_heart_sites(data_dir, sites_dir)
        sites = [sites_dir / f"site-{i}" for i in range(len(manifests))]
        return PreparedSplit(spec, sites_dir, sites, list(sites), "")
    from simulation.data.datasets import MEDMNIST, medmnist_path
    from simulation.data.sites import GLOBAL_EVAL, SplitPlan, create_virtual_sites

    dataset = str(cfg.data.get("dataset", "pneumoniamnist"))
    if dataset not in MEDMNIST:
        raise ConfigError(f"unknown dataset {dataset!r}; known: {sorted(MEDMNIST)}")
    num_sites = int(cfg.data.get("sites", 3))
    plan = SplitPlan(num_sites=num_sites, partitioner=spec.partition, alpha=spec.alpha, seed=seed)
    create_virtual_sites(
        medmnist_path(dataset, cfg.data.get("dir")),
        sites_dir,
        plan=plan,
        label_names=MEDMNIST[dataset].label_names,
        dataset_name=dataset,
    )
    sites = [sites_dir / f"site-{i}" for i in range(num_sites)]
    return PreparedSplit(
        spec, sites_dir, sites, [sites_dir / GLOBAL_EVAL], str(sites_dir / GLOBAL_EVAL)
    )


# ----------------------------------------------------------------------- baselines
def score(
    model: torch.nn.Module, eval_sets: list[Path], run: RunConfig, *, device: torch.device
) -> dict[str, float]:
    """Mean over the evaluation sets of each metric on their ``val`` split.

    Returns
    -------
    dict[str, float]
        ``<metric>`` = unweighted mean over sets (FLamby's average over centres) and
        ``<metric>@<set name>`` per set.

    """
    task = get_task(run.task)
    per: dict[str, dict[str, float]] = {}
    for path in eval_sets:
        split = SiteDataset(path).load("val")
        per[path.name] = task.evaluate(
            model, split.images, split.labels, batch_size=run.evaluation.batch_size, device=device
        )
    out: dict[str, float] = {}
    for key in per[next(iter(per))]:
        if key == "num-examples":
            continue
        values = [float(m[key]) for m in per.values()]
        finite = [v for v in values if math.isfinite(v)]
        out[key] = float(np.mean(finite)) if finite else math.nan
        out |= {f"{key}@{name}": float(m[key]) for name, m in per.items()}
    return out


# ----------------------------------------------------------------------- federated
def run_federated(
    out: Path,
    run: RunConfig,
    *,
    num_sites: int,
    cpus_per_site: int = 1,
    timeout: float = 1800.0,
    on_line: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run one federated training on Flower's simulation engine; return its round log.

    The run directory ``out`` receives config.json, rounds.jsonl, checkpoints/ and
    final_model.pt (server/app.py), like ``medfed simulate``.

    Raises
    ------
    FederationError
        If the run fails or times out (simulation/launch/engine.py).

    """
    from server.app import RUN_KIND
    from simulation.launch.engine import run_simulation
    from simulation.research.summary import read_rounds

    fresh = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    if fresh and marker_kind(out) != RUN_KIND:
        write_marker(out, RUN_KIND)  # the ServerApp refuses an unmarked non-empty dir
    run_simulation(
        run_dir=out,
        run_config=run.override({"run-dir": str(out)}).to_run_config(),
        num_sites=num_sites,
        cpus_per_site=cpus_per_site,
        on_line=on_line,
        timeout=timeout,
    )
    return read_rounds(out)


# -------------------------------------------------------------------------- driver
_WHAT = "experiment directory"


def why_not_experiment_dir(path: Path) -> str | None:
    """Return ``None`` when ``path`` is provably a medfed experiment directory, else why not.

    Proof: medfed's ownership marker of kind :data:`EXPERIMENT_KIND`, or, for
    experiments from before the marker, both ``experiment.json`` and ``results.csv``.
    An empty directory holds nothing to lose.
    """
    if path.is_symlink() or not path.is_dir():
        return "it is not a directory"
    if not any(path.iterdir()) or marker_kind(path) == EXPERIMENT_KIND:
        return None
    if (path / EXPERIMENT_JSON).is_file() and (path / RESULTS_CSV).is_file():
        return None
    return (
        "it is not a medfed experiment directory (no medfed marker, no experiment.json + "
        "results.csv)"
    )


def run_experiment(
    cfg: ExperimentConfig,
    out: Path,
    *,
    on_progress: Callable[[str], None] | None = None,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Run every split x seed: pooled, local and each federated setting; write results.

    Returns
    -------
    list[dict]
        All rows (also written to ``results.csv`` / ``results.json``), ``kind`` ``"run"``
        for one seed and ``"summary"`` for the mean/std over seeds.

    """
    device = device or resolve_device("cpu")
    note = on_progress or (lambda _msg: None)
    # never overwrite: `medfed experiment --force` moves a previous experiment aside first
    check_replaceable(out, overwrite=False, why_not_ours=why_not_experiment_dir, what=_WHAT)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, EXPERIMENT_KIND)
    (out / EXPERIMENT_JSON).write_text(json.dumps(cfg.source, indent=2, default=str) + "\n")
    rows: list[dict[str, Any]] = []
    for spec in cfg.splits:
        for seed in cfg.seeds:
            split_dir = out / spec.label / f"seed-{seed}"
            prepared = prepare_split(cfg, spec, split_dir, seed=seed)
            n = len(prepared.sites)
            base_run = cfg.run_config_for(cfg.federated[0], seed=seed, num_sites=n)
            pooled, local, best_site = _run_baselines(
                spec, prepared, split_dir, base_run, cfg.rounds, seed=seed, device=device, note=note
            )
            for fed in cfg.federated:
                row = _run_federated_setting(
                    cfg, spec, fed, prepared, split_dir, (pooled, local, best_site), seed, device
                )
                rows.append(row)
                note(
                    f"{spec.label} seed {seed} {fed.label}: federated {METRIC} "
                    f"{row['federated']:.4f} (fed/pooled {row['fed/pooled']:.3f}) "
                    f"[{row['seconds']:.0f} s]"
                )
    rows += summarise(rows)
    write_results(rows, out)
    return rows


def _run_baselines(
    spec: SplitSpec,
    prepared: PreparedSplit,
    split_dir: Path,
    base_run: RunConfig,
    rounds: int,
    *,
    seed: int,
    device: torch.device,
    note: Callable[[str], None],
) -> tuple[dict[str, float], dict[str, dict[str, float]], str]:
    """Train and score the pooled and per-site local baselines of one split x seed.

    Each baseline trains for ``rounds x local_epochs`` epochs; the scores are written
    to ``split_dir/baselines.json``.

    Returns
    -------
    tuple
        ``(pooled, local, best_site)``: the pooled model's metrics, each site's local
        model's metrics, and the site whose local model scored best on ``METRIC``.

    """
    epochs = rounds * base_run.train.local_epochs
    t0 = time.perf_counter()
    pooled_model, _ = train_centralised(
        _pooled_train(prepared), base_run, epochs=epochs, seed=seed, device=device
    )
    pooled = score(pooled_model, prepared.eval_sets, base_run, device=device)
    local = {}
    for site in prepared.sites:
        model, _ = train_centralised(
            SiteDataset(site).load("train"),
            base_run,
            epochs=epochs,
            seed=seed,
            device=device,
        )
        local[site.name] = score(model, prepared.eval_sets, base_run, device=device)
    best_site = max(local, key=lambda s: _finite(local[s].get(METRIC)))
    note(
        f"{spec.label} seed {seed}: pooled {METRIC} {pooled[METRIC]:.4f}, best local "
        f"({best_site}) {local[best_site][METRIC]:.4f} [{time.perf_counter() - t0:.1f} s]"
    )
    (split_dir / "baselines.json").write_text(
        json.dumps({"pooled": pooled, "local": local}, indent=2) + "\n"
    )
    return pooled, local, best_site


def _run_federated_setting(
    cfg: ExperimentConfig,
    spec: SplitSpec,
    fed: FederatedSpec,
    prepared: PreparedSplit,
    split_dir: Path,
    baselines: tuple[dict[str, float], dict[str, dict[str, float]], str],
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Run one federated setting on one split x seed and score it against the baselines.

    A failed run (any ``MedfedError``) is logged and gives a row with a NaN score and
    its ``error``, so that one failure does not lose the other runs.

    Returns
    -------
    dict
        The ``kind`` ``"run"`` results row.

    """
    from common.checkpoint import load_checkpoint

    pooled, local, best_site = baselines
    n = len(prepared.sites)
    run = cfg.run_config_for(fed, seed=seed, num_sites=n).override(
        {
            "sites-dir": str(prepared.sites_dir),
            "eval-dataset-dir": prepared.eval_dataset_dir,
        }
    )
    run_dir = split_dir / f"fed-{fed.label}"
    t1 = time.perf_counter()
    error = ""
    try:
        history = run_federated(
            run_dir,
            run,
            num_sites=n,
            cpus_per_site=cfg.cpus_per_site,
            timeout=cfg.timeout,
        )
        final = load_checkpoint(run_dir / "final_model.pt").build_model()
        federated = score(final, prepared.eval_sets, run, device=device)
    except MedfedError as exc:  # one failed run must not lose the others
        log.error("%s / %s / seed %d failed: %s", spec.label, fed.label, seed, exc)
        error, history, federated = str(exc), [], {METRIC: math.nan}
    eps = _max_epsilon(history)
    return {
        "kind": "run",
        "split": spec.label,
        "setting": fed.label,
        "strategy": run.strategy.name,
        "dp": run.dp.enabled,
        "seed": seed,
        "rounds": cfg.rounds,
        "federated": federated[METRIC],
        "pooled": pooled[METRIC],
        "best-local": local[best_site][METRIC],
        "best-local-site": best_site,
        "fed/pooled": _ratio(federated[METRIC], pooled[METRIC]),
        "fed/best-local": _ratio(federated[METRIC], local[best_site][METRIC]),
        "federated-auroc": federated.get("auroc", math.nan),
        "pooled-auroc": pooled.get("auroc", math.nan),
        "max-epsilon": eps,
        "seconds": round(time.perf_counter() - t1, 1),
        "run-dir": str(run_dir),
        "error": error,
    }


def _pooled_train(prepared: PreparedSplit) -> SplitArrays:
    """Return the pooled train split: the heart data ships one (pooled normalisation)."""
    pooled = prepared.sites_dir / "pooled"
    if (pooled / "manifest.json").is_file():
        return SiteDataset(pooled).load("train", mmap=False)
    return pool_splits(prepared.sites)


def _finite(v: float | None) -> float:
    return float(v) if v is not None and math.isfinite(v) else -math.inf


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else math.nan


def _max_epsilon(history: list[dict[str, Any]]) -> float:
    eps = [
        float(s["epsilon"])
        for line in history
        for s in line.get("train", {}).get("sites", {}).values()
        if s.get("epsilon") is not None
    ]
    return max(eps) if eps else 0.0


SUMMARY_KEYS = ("federated", "pooled", "best-local", "fed/pooled", "fed/best-local")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) standard deviation over seeds per split x setting."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == "run":
            groups.setdefault((r["split"], r["setting"]), []).append(r)
    out = []
    for (split, setting), rs in groups.items():
        row: dict[str, Any] = {
            "kind": "summary",
            "split": split,
            "setting": setting,
            "strategy": rs[0]["strategy"],
            "dp": rs[0]["dp"],
            "seeds": len(rs),
            "max-epsilon": max(r["max-epsilon"] for r in rs),
        }
        for key in SUMMARY_KEYS:
            values = [float(r[key]) for r in rs if math.isfinite(float(r[key]))]
            row[key] = statistics.fmean(values) if values else math.nan
            row[f"{key}-std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    """Write ``results.json`` and ``results.csv`` (union of the rows' keys as columns)."""
    (out / RESULTS_JSON).write_text(json.dumps(rows, indent=2, default=_json_default) + "\n")
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with (out / RESULTS_CSV).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def read_results(out: Path) -> list[dict[str, Any]]:
    """Rows of ``results.json`` in an experiment directory ([] if absent)."""
    path = out / RESULTS_JSON
    return json.loads(path.read_text()) if path.is_file() else []
