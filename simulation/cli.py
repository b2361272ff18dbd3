"""Researcher commands: ``medfed simulate``, ``medfed evaluate``, ``medfed download``."""

from __future__ import annotations

import json
import logging
import sys
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console

from common.config import RunConfig, check_writable_dir, load_config_file
from common.errors import ConfigError, DataError, MedfedError

log = logging.getLogger(__name__)
console = Console()
err_console = Console(stderr=True)


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` pairs with TOML value syntax (``lr=0.1``, ``model="cnn"``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # bare strings: --set model=cnn
        out[key.strip()] = value
    return out


def _fail(exc: MedfedError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=2)


def _kept(previous: Path | None) -> None:
    """Tell the user where the run that ``--force`` would have replaced is kept."""
    if previous is not None:
        err_console.print(f"the previous run is kept at {previous}")


def _new_run_dir(base: Path) -> Path:
    """Return ``base``, or ``base-2``, ``base-3``, ... if it exists (two runs in a second)."""
    candidate, n = base, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


#: Dataset ``medfed simulate`` federates when ``--dataset`` is not given, by task.
DEFAULT_DATASETS = {"classification": "pneumoniamnist", "segmentation": "chase_db1"}


def _check_gpus(gpus_per_site: float) -> None:
    """Refuse ``--gpus-per-site`` > 0 without CUDA: Ray would wait for GPUs forever.

    The fraction becomes Flower's federation config ``client-resources-num-gpus``
    (simulation/engine.py): Ray then packs ``1 / fraction`` virtual sites per GPU and
    each ClientApp picks its device from node config ``device`` (default ``auto``).
    """
    import torch

    if gpus_per_site < 0:
        raise ConfigError(f"--gpus-per-site={gpus_per_site} must be >= 0")
    if gpus_per_site > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"--gpus-per-site={gpus_per_site} but CUDA is not available here; use 0 (CPU)."
        )


def _check_model_task(run: RunConfig) -> None:
    """Refuse a model whose ``ModelSpec.task`` is not the run's ``task``."""
    from common.models import get_spec

    spec_task = get_spec(run.model).task
    if spec_task != run.task:
        raise ConfigError(
            f"model {run.model!r} solves task {spec_task!r}, which does not match run config "
            f"'task'={run.task!r}; drop --task (it defaults to the model's) or pick a model "
            "for that task."
        )


def _task_overrides(
    overrides: dict[str, Any], *, model: str | None, task: str | None
) -> dict[str, Any]:
    """Return run-config ``model`` / ``task`` from ``--model`` / ``--task``.

    The task defaults to the model's (``ModelSpec.task``), so ``--model unet`` alone
    selects segmentation.
    """
    from common.models import get_spec

    out: dict[str, Any] = {}
    if model is not None:
        out["model"] = model
    if task is not None:
        out["task"] = task
    elif "task" not in overrides and (model is not None or "model" in overrides):
        out["task"] = get_spec(str(out.get("model", overrides.get("model")))).task
    return out


def simulate(
    ctx: typer.Context,
    sites: Annotated[int, typer.Option("--sites", "-n", help="Number of virtual hospitals.")] = 3,
    partition: Annotated[
        str, typer.Option(help="How to split the training data: 'iid' or 'dirichlet'.")
    ] = "dirichlet",
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration; smaller = more label skew.")
    ] = 0.5,
    rounds: Annotated[int, typer.Option(help="Federated rounds (num-server-rounds).")] = 10,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Public dataset: pneumoniamnist, breastmnist (classification) or chase_db1 "
            "(segmentation, split by child). Default: by task."
        ),
    ] = None,
    task_name: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="classification or segmentation (run config 'task'); default: the model's.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Registered model, e.g. cnn, gru, lstm, unet (run config 'model')."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data root (default: $MEDFED_DATA_DIR, then ../shared/data)."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Output directory (default: runs/sim-<timestamp>).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace --run-dir if it holds a previous medfed run (never any other "
            "folder); the old run is kept aside until the new one completes.",
        ),
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            metavar="RUN_DIR",
            help="Resume the run in RUN_DIR after its last finished round (e.g. after a "
            "crash), with its own settings and sites; only --timeout, --cpus-per-site, "
            "--gpus-per-site and run-config timeouts may be given with it.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for splits, init and sampling.")] = 42,
    config: Annotated[
        Path | None, typer.Option(help="TOML file of run-config keys (kebab-case).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a run-config key, e.g. --set local-epochs=2."),
    ] = None,
    cpus_per_site: Annotated[
        int, typer.Option(help="CPU cores per virtual site; 1 runs 2 sites at once on 2 cores.")
    ] = 1,
    gpus_per_site: Annotated[
        float, typer.Option(help="GPU fraction per site (e.g. 0.25 packs 4 sites on a GPU).")
    ] = 0.0,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Run the virtual sites on an existing (multi-machine) Ray cluster: 'auto' "
            "or HEAD_IP:6379 (sets RAY_ADDRESS for Flower's Ray driver). The run directory "
            "must be on a filesystem every Ray node mounts at the same path. Default: a "
            "local Ray instance on this machine's cores.",
        ),
    ] = None,
    via_dicom: Annotated[
        bool,
        typer.Option(
            help="Hospital path: write each site's images as DICOM files, then ingest them "
            "(medfed export-dicom + medfed ingest) before training."
        ),
    ] = False,
    site_policy: Annotated[
        Path | None,
        typer.Option(
            "--site-policy",
            help="Site policy TOML every virtual site applies, as a hospital's worker would "
            "(write one with `medfed site policy init`). Default: the hospital default with "
            "the research limits lifted (DP and SecAgg+ may be off).",
        ),
    ] = None,
) -> None:
    """Run N virtual hospitals on Flower's simulation engine and report per round.

    Splits the dataset's training images into site datasets (IID or Dirichlet label
    skew), starts a local simulation SuperLink, runs the medfed ServerApp and ClientApps
    with `flwr run`, shows progress per round, prints the global validation accuracy and
    AUROC per round, says which round's global model validated best at the sites, and
    leaves everything in the run directory: config.json, rounds.jsonl, checkpoints/,
    final_model.pt, best_model.pt (that best round's model), sites/.

    Example: medfed simulate --sites 5 --partition iid --rounds 5 --set local-epochs=2

    Resume a run that was stopped (a crash, a kill): medfed simulate --resume RUN_DIR
    """
    if resume is not None:
        _resume(
            ctx,
            resume,
            config=config,
            set_=set_ or [],
            timeout=timeout,
            resources={"cpus_per_site": cpus_per_site, "gpus_per_site": gpus_per_site},
            ray_address=ray_address,
        )
        return
    from simulation.chase import DATASET as CHASE
    from simulation.chase import ChasePlan, create_chase_sites
    from simulation.datasets import MEDMNIST, medmnist_path, resolve_data_dir
    from simulation.engine import run_simulation
    from simulation.sites import GLOBAL_EVAL, SplitPlan, create_virtual_sites
    from simulation.summary import (
        round_progress,
    )

    try:
        overrides: dict[str, Any] = {}
        if config is not None:
            overrides |= load_config_file(config)
        overrides |= _parse_set(set_ or [])
        overrides |= {"num-server-rounds": rounds, "seed": seed, "min-sites": sites}
        overrides |= _task_overrides(overrides, model=model, task=task_name)
        _check_gpus(gpus_per_site)
        dataset = dataset or DEFAULT_DATASETS.get(str(overrides.get("task")), "pneumoniamnist")
        plan = SplitPlan(num_sites=sites, partitioner=partition, alpha=alpha, seed=seed)
        if dataset not in MEDMNIST and dataset != CHASE:
            raise ConfigError(f"unknown dataset {dataset!r}; known: {sorted([*MEDMNIST, CHASE])}")
        npz = None if dataset == CHASE else medmnist_path(dataset, data_dir)
        out = (run_dir or _new_run_dir(Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S"))).resolve()
        overrides |= {
            "run-dir": str(out),
            "sites-dir": str(out / "sites"),
            "eval-dataset-dir": str(out / "sites" / GLOBAL_EVAL),
        }
        if site_policy is not None:
            from client.site.policy import SitePolicy

            SitePolicy.load(site_policy)  # a bad policy fails before any work
            overrides["site-policy"] = str(site_policy.resolve())
        run = RunConfig.from_run_config(overrides)  # fail before any work on a bad config
        _check_model_task(run)
        check_writable_dir(out)  # an unwritable run dir fails here, not in a site or round
    except MedfedError as exc:
        raise _fail(exc) from None

    from common.fsutil import discard, marker_kind, set_aside, write_marker
    from server.app import RUN_KIND, why_not_run_dir

    try:  # an existing run is never overwritten; --force moves a medfed run aside
        previous = set_aside(
            out, overwrite=force, why_not_ours=why_not_run_dir, what="run directory"
        )
    except MedfedError as exc:
        raise _fail(exc) from None
    if previous is not None:
        console.print(f"previous run moved aside to {previous} until this one completes")
    out.mkdir(parents=True, exist_ok=True)
    if marker_kind(out) != RUN_KIND:
        write_marker(out, RUN_KIND)  # out is new or empty: medfed's run directory
    console.print(
        f"[bold]medfed simulate[/]: {sites} sites, {partition}"
        f"{f' alpha={alpha}' if partition == 'dirichlet' else ''}, "
        f"{rounds} rounds, model {run.model} -> {out}"
    )
    try:
        if npz is None:  # CHASE_DB1 segmentation: by-child split, see simulation/chase.py
            manifests = create_chase_sites(
                resolve_data_dir(data_dir),
                out / "sites",
                plan=ChasePlan(num_sites=sites, seed=seed),
            )
        else:
            manifests = create_virtual_sites(
                npz,
                out / "sites",
                plan=plan,
                label_names=MEDMNIST[dataset].label_names,
                dataset_name=dataset,
                via_dicom=out / "dicom-exports" if via_dicom else None,
            )
    except MedfedError as exc:
        _kept(previous)
        raise _fail(exc) from None
    for i, m in enumerate(manifests):
        counts = m["splits"]["train"]["label_counts"]
        console.print(
            f"  site-{i}: {m['splits']['train']['count']} train / "
            f"{m['splits']['val']['count']} val images, labels {counts}"
        )

    verbose = logging.getLogger().level <= logging.DEBUG
    with round_progress(console, rounds, echo_all=verbose) as on_line:
        try:
            run_simulation(
                run_dir=out,
                run_config=run.to_run_config(),
                num_sites=sites,
                cpus_per_site=cpus_per_site,
                gpus_per_site=gpus_per_site,
                on_line=on_line,
                timeout=timeout,
                ray_address=ray_address,
            )
        except MedfedError as exc:
            _kept(previous)
            raise _fail(exc) from None

    discard(previous)  # the new run is complete: the replaced one goes
    eval_data = npz if npz is not None else out / "sites" / GLOBAL_EVAL
    _report(out, eval_data)


def _report(out: Path, eval_data: Path) -> None:
    """Print the finished run's tables and where its models are."""
    from server.selection import BEST_MODEL
    from simulation.summary import best_model_line, read_rounds, site_table, summary_table

    history = read_rounds(out)
    console.print(summary_table(history))
    console.print(site_table(history))
    latest = out.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        latest.unlink(missing_ok=True)
        latest.symlink_to(out.name)
    if line := best_model_line(history):
        console.print(line)
    console.print(f"run directory: [bold]{out}[/] (final model: {out / 'final_model.pt'})")
    best = out / BEST_MODEL
    model_file = best if best.is_file() else out / "final_model.pt"
    console.print(
        f"check it on any split: medfed evaluate --checkpoint {model_file} "
        f"--data {eval_data} --split val"
    )


#: ``simulate`` options that define a new run: a resumed run has its own.
_NEW_RUN_OPTIONS = (
    "sites", "partition", "alpha", "rounds", "dataset", "task_name", "model", "data_dir",
    "run_dir", "force", "seed", "via_dicom", "site_policy",
)  # fmt: skip


def _resume(
    ctx: typer.Context,
    run_dir: Path,
    *,
    config: Path | None,
    set_: list[str],
    timeout: float,
    resources: dict[str, Any],
    ray_address: str | None,
) -> None:
    """``medfed simulate --resume RUN_DIR``: go on with the run in ``run_dir``.

    Checks everything the ServerApp will check (a medfed run, not finished, not still
    going on, a readable resume state, the same model and strategy) before starting the
    engine, then runs the rest of the rounds on the run's own virtual sites
    (``RUN_DIR/sites``) with run config ``resume-from`` (server/resume.py).
    """
    from click.core import ParameterSource

    from server.app import CONFIG_FILE, why_not_run_dir
    from server.resume import check_resumable, load_state, resumed_config, run_lock
    from simulation.engine import run_simulation
    from simulation.sites import GLOBAL_EVAL
    from simulation.summary import round_progress

    out = run_dir.resolve()
    try:
        _check_gpus(float(resources["gpus_per_site"]))
        given = [
            "--" + name.replace("_", "-").replace("task-name", "task")
            for name in _NEW_RUN_OPTIONS
            if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
        ]
        if given:
            raise ConfigError(
                f"--resume continues the run in {run_dir} with its own settings; drop "
                f"{', '.join(given)} (or start a new run without --resume)."
            )
        if (why := why_not_run_dir(out)) is not None:
            raise ConfigError(f"--resume {run_dir}: {why}; give the directory of a medfed run.")
        with run_lock(out):  # fails now if the run is still going on
            state = load_state(out)
            check_resumable(out, state)
        if state is not None:
            saved = dict(state.run_config)
        else:
            try:
                saved = json.loads((out / CONFIG_FILE).read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{out / CONFIG_FILE} cannot be read ({exc})") from None
        saved = _moved(saved, out)
        overrides = (load_config_file(config) if config is not None else {}) | _parse_set(set_)
        current = RunConfig.from_run_config(
            {**saved, **overrides, "run-dir": str(out), "resume-from": str(out)}
        )
        run = resumed_config(saved, current, run_dir=out)  # the ServerApp's own checks
        sites = run.min_sites
        missing = [i for i in range(sites) if not (out / "sites" / f"site-{i}").is_dir()]
        if missing:
            raise ConfigError(
                f"--resume {run_dir}: its virtual sites {missing} are missing from "
                f"{out / 'sites'}; the run cannot go on without them."
            )
    except MedfedError as exc:
        raise _fail(exc) from None
    done = state.round if state is not None else 0
    console.print(
        f"[bold]medfed simulate --resume[/]: {out}, {sites} sites, after round {done} of "
        f"{run.num_server_rounds}"
    )
    verbose = logging.getLogger().level <= logging.DEBUG
    with round_progress(console, max(1, run.num_server_rounds - done), echo_all=verbose) as on:
        try:
            run_simulation(
                run_dir=out,
                run_config=current.to_run_config(),
                num_sites=sites,
                on_line=on,
                timeout=timeout,
                ray_address=ray_address,
                **resources,
            )
        except MedfedError as exc:
            raise _fail(exc) from None
    _report(out, out / "sites" / GLOBAL_EVAL)


def _moved(saved: dict[str, Any], out: Path) -> dict[str, Any]:
    """Return ``saved`` with paths inside the run's old directory moved to ``out``."""
    old = Path(str(saved.get("run-dir") or out))
    moved = dict(saved)
    for key in ("sites-dir", "eval-dataset-dir"):
        value = Path(str(saved.get(key) or ""))
        if saved.get(key) and value.is_relative_to(old):
            moved[key] = str(out / value.relative_to(old))
    return moved


def evaluate(
    checkpoint: Annotated[
        Path, typer.Option(help="A medfed checkpoint (final_model.pt) or `medfed export` model.ts.")
    ],
    data: Annotated[
        Path,
        typer.Option(help="A MedMNIST-format .npz file, or a site dataset directory (any task)."),
    ],
    split: Annotated[str, typer.Option(help="Split of the file: train, val or test.")] = "val",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Binary classifiers: predict class 1 when P(class 1) >= this. Default: the "
            "checkpoint's operating point (chosen on the sites' pooled validation), else 0.5.",
            min=0.0,
            max=1.0,
        ),
    ] = None,
    at_default: Annotated[
        bool,
        typer.Option(
            "--at-default",
            help="Binary classifiers: also report the metrics at the default threshold 0.5.",
        ),
    ] = False,
    balanced: Annotated[
        bool,
        typer.Option(
            "--balanced",
            help="Classification: evaluate on a class-balanced resample of the split (every "
            "class cut to the rarest class's count, seeded): a stand-in for a hospital "
            "whose prevalence differs.",
        ),
    ] = False,
) -> None:
    """Evaluate a saved global model on any split of a MedMNIST file or a site dataset.

    Prints JSON: the metrics of the checkpoint's task (classification: accuracy,
    balanced accuracy, AUROC, sensitivity, specificity, F1; segmentation: Dice and pixel
    accuracy), the loss and the number of images. The checkpoint names its model, task
    and configuration, so no other input is needed. A site dataset directory (e.g.
    ``runs/latest/sites/global-val``) works for every task; a ``.npz`` file for
    classification.

    A binary classifier is scored at a decision threshold: the checkpoint's operating
    point (``best_model.pt`` of a run stores the threshold chosen on the sites' pooled
    validation ROC, run config ``operating-point``), ``--threshold``, or 0.5; the JSON
    names it and its source and adds the confusion matrix (``tp``, ``fp``, ``tn``,
    ``fn``), PPV and NPV. ``--at-default`` adds the same block at 0.5 under ``at-0.5``.
    """
    from common.device import resolve_device
    from common.evaluation import evaluate_binary_at, evaluate_task
    from common.export import load_model_file
    from common.site_dataset import SiteDataset
    from common.tasks import get_task
    from simulation.datasets import load_medmnist_split, to_model_images

    try:
        ckpt, model = load_model_file(checkpoint)  # a checkpoint or a `medfed export` file
        if data.is_dir():
            site = SiteDataset(data)
            get_task(ckpt.task).check_dataset(
                site,
                model=ckpt.model,
                num_classes=int(ckpt.model_kwargs.get("num_classes", len(site.label_names))),
            )
            arrays = site.load(split)
            images, labels = arrays.images, arrays.labels
        else:
            raw_images, labels = load_medmnist_split(data, split)
            images = to_model_images(raw_images)
        if balanced:
            keep = balanced_indices(np.asarray(labels), seed=0)
            images, labels = images[keep], np.asarray(labels)[keep]
        binary = ckpt.task != "segmentation" and int(ckpt.model_kwargs.get("num_classes", 0)) == 2
        if binary:
            t, source = _decision_threshold(ckpt, threshold)
            wanted = {"chosen": t} | ({"default": 0.5} if at_default else {})
            free, at = evaluate_binary_at(
                model, images, labels, thresholds=wanted, device=resolve_device(device)
            )
            metrics = free | {"threshold": t} | at["chosen"]
        else:
            metrics = evaluate_task(ckpt.task, model, images, labels, device=resolve_device(device))
    except MedfedError as exc:
        raise _fail(exc) from None

    def clean(values: dict[str, float]) -> dict[str, float | None]:
        return {k: (None if v != v else round(v, 6)) for k, v in values.items()}

    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": ckpt.model,
        "round": ckpt.round,
        "data": str(data),
        "split": split,
        "num-images": int(metrics.pop("num-examples")),
    }
    if balanced:
        result["resample"] = "class-balanced (seed 0)"
    if binary:
        result["threshold-source"] = source
    result |= clean(metrics)
    if binary and at_default:
        result["at-0.5"] = clean(at["default"])
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


def balanced_indices(labels: np.ndarray, *, seed: int) -> np.ndarray:
    """Return indices of a class-balanced resample (each class cut to the rarest's count).

    Parameters
    ----------
    labels : numpy.ndarray
        int ``(N,)`` image-level labels.
    seed : int
        Seed of the draw without replacement (``numpy.random.default_rng``).

    Returns
    -------
    numpy.ndarray
        int64 sorted indices, ``K * min_c n_c`` of them.

    Raises
    ------
    DataError
        If the labels are not image-level ``(N,)``.
    """
    if labels.ndim != 1:
        raise DataError("--balanced needs image-level labels (classification)")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n = int(counts.min())
    picked = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c in classes]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _decision_threshold(ckpt: Any, override: float | None) -> tuple[float, str]:
    """Return the threshold ``medfed evaluate`` scores a binary classifier at, and why.

    The checkpoint's rule is :func:`common.explain.decision_threshold`'s, so ``medfed
    explain`` and ``medfed evaluate`` always decide alike.
    """
    from common.explain import decision_threshold

    if override is not None:
        return float(override), "--threshold"
    decision = decision_threshold(ckpt, 2)
    op = ckpt.operating_point
    if decision.source == "checkpoint" and op:
        return float(decision.threshold), (
            f"checkpoint operating point ({op['method']}, pooled site validation of round "
            f"{op.get('round', '?')})"
        )
    return float(decision.threshold), "default 0.5 (the checkpoint has no operating point)"


def download(
    dataset: Annotated[str, typer.Argument(help="pneumoniamnist or breastmnist.")],
    data_dir: Annotated[Path, typer.Option(help="Where to store <dataset>/<dataset>.npz.")],
) -> None:
    """Download an official MedMNIST v2 file (Zenodo) and verify its MD5 checksum."""
    from simulation.datasets import download_medmnist

    try:
        path = download_medmnist(dataset, data_dir)
    except MedfedError as exc:
        raise _fail(exc) from None
    except OSError as exc:
        err_console.print(f"[bold red]error:[/] download failed ({exc}); check your internet")
        raise typer.Exit(code=2) from None
    console.print(f"{dataset}: {path} (checksum ok)")


def register(app: typer.Typer) -> None:
    """Add the researcher commands to the root ``medfed`` app."""
    app.command()(simulate)
    app.command()(evaluate)
    app.command()(download)
    from simulation.pooled import pooled_baseline

    app.command()(pooled_baseline)
    from simulation.model_cli import register as register_model_commands

    register_model_commands(app)  # medfed explain, medfed export
