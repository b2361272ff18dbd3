"""Researcher commands: ``medfed simulate``, ``medfed evaluate``, ``medfed download``."""

from __future__ import annotations

import json
import logging
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console

from common.cli import fail
from common.config import RunConfig, check_writable_dir, load_config_file
from common.errors import ConfigError, DataError, MedfedError

if TYPE_CHECKING:
    from simulation.data.sites import SplitPlan

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
    (simulation/launch/engine.py): Ray then packs ``1 / fraction`` virtual sites per GPU and
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


def _run_config_keys(
    *,
    file_keys: dict[str, Any],
    set_keys: dict[str, Any],
    options: dict[str, tuple[str, Any]],
    config: Path | None,
) -> dict[str, Any]:
    """Merge the run-config keys of ``--config``, ``--set`` and the options that stand for one.

    Precedence, highest first: an option given on the command line (``options``: ``{key:
    (flag, value or None)}``) or ``--set KEY=VALUE``, then the ``--config`` file, then the
    app's defaults. An option left out (``None``) overrides nothing, so a value from the
    file or ``--set`` is never replaced by an option's default.

    Raises
    ------
    ConfigError
        When an option and ``--set`` give its key different values.
    """
    keys = {**file_keys, **set_keys}
    for key, (flag, value) in options.items():
        if value is None:
            continue
        if key in set_keys and set_keys[key] != value:
            raise ConfigError(
                f"{flag} {value} and --set {key}={set_keys[key]!r} disagree; give only one of them."
            )
        if key in file_keys and key not in set_keys and file_keys[key] != value:
            note = f"{flag} {value} overrides {key} = {file_keys[key]!r} of --config {config}"
            log.info("%s", note)
            err_console.print(f"note: {note}")
        keys[key] = value
    return keys


def _int_key(keys: dict[str, Any], key: str, default: int) -> int:
    """Return the integer run-config ``key`` (``default`` when absent).

    Raises
    ------
    ConfigError
        As :class:`RunConfig` does, when the value is not an integer.
    """
    value = keys.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        RunConfig.from_run_config({key: value})  # raises the type error that names the key
    return int(value)


_SitesOpt = Annotated[
    int | None,
    typer.Option(
        "--sites",
        "-n",
        help="Number of virtual hospitals (run config 'min-sites'). Default: the config's "
        "min-sites (3).",
    ),
]
_PartitionOpt = Annotated[
    str, typer.Option(help="How to split the training data: 'iid' or 'dirichlet'.")
]
_AlphaOpt = Annotated[
    float, typer.Option(help="Dirichlet concentration; smaller = more label skew.")
]
_RoundsOpt = Annotated[
    int | None,
    typer.Option(
        help="Federated rounds (run config 'num-server-rounds'). Default: the config's "
        "num-server-rounds (10)."
    ),
]
_DatasetOpt = Annotated[
    str | None,
    typer.Option(
        help="Public dataset: pneumoniamnist, breastmnist (classification) or chase_db1 "
        "(segmentation, split by child). Default: by task."
    ),
]
_TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="classification or segmentation (run config 'task'); default: the model's.",
    ),
]
_ModelOpt = Annotated[
    str | None,
    typer.Option(help="Registered model, e.g. cnn, gru, lstm, unet (run config 'model')."),
]
_DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="Data root (default: $MEDFED_DATA_DIR, then ../shared/data)."),
]
_RunDirOpt = Annotated[
    Path | None, typer.Option(help="Output directory (default: runs/sim-<timestamp>).")
]
_ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace --run-dir if it holds a previous medfed run (never any other "
        "folder); the old run is kept aside until the new one completes.",
    ),
]
_ResumeOpt = Annotated[
    Path | None,
    typer.Option(
        "--resume",
        metavar="RUN_DIR",
        help="Resume the run in RUN_DIR after its last finished round (e.g. after a "
        "crash), with its own settings and sites; only --timeout, --cpus-per-site, "
        "--gpus-per-site and run-config timeouts may be given with it.",
    ),
]
_SeedOpt = Annotated[
    int | None,
    typer.Option(
        help="Seed for splits, init and sampling (run config 'seed'). Default: the "
        "config's seed (42)."
    ),
]
_ConfigOpt = Annotated[Path | None, typer.Option(help="TOML file of run-config keys (kebab-case).")]
_SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a run-config key, e.g. --set local-epochs=2."),
]
_CpusPerSiteOpt = Annotated[
    int, typer.Option(help="CPU cores per virtual site; 1 runs 2 sites at once on 2 cores.")
]
_GpusPerSiteOpt = Annotated[
    float, typer.Option(help="GPU fraction per site (e.g. 0.25 packs 4 sites on a GPU).")
]
_TimeoutOpt = Annotated[float, typer.Option(help="Give up after this many seconds.")]
_RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Run the virtual sites on an existing (multi-machine) Ray cluster: 'auto' "
        "or HEAD_IP:6379 (sets RAY_ADDRESS for Flower's Ray driver). The run directory "
        "must be on a filesystem every Ray node mounts at the same path. Default: a "
        "local Ray instance on this machine's cores.",
    ),
]
_ViaDicomOpt = Annotated[
    bool,
    typer.Option(
        help="Hospital path: write each site's images as DICOM files, then ingest them "
        "(medfed export-dicom + medfed ingest) before training."
    ),
]
_SitePolicyOpt = Annotated[
    Path | None,
    typer.Option(
        "--site-policy",
        help="Site policy TOML every virtual site applies, as a hospital's worker would "
        "(write one with `medfed site policy init`). Default: the hospital default with "
        "the research limits lifted (DP and SecAgg+ may be off).",
    ),
]


def simulate(
    ctx: typer.Context,
    sites: _SitesOpt = None,
    partition: _PartitionOpt = "dirichlet",
    alpha: _AlphaOpt = 0.5,
    rounds: _RoundsOpt = None,
    dataset: _DatasetOpt = None,
    task_name: _TaskOpt = None,
    model: _ModelOpt = None,
    data_dir: _DataDirOpt = None,
    run_dir: _RunDirOpt = None,
    force: _ForceOpt = False,
    resume: _ResumeOpt = None,
    seed: _SeedOpt = None,
    config: _ConfigOpt = None,
    set_: _SetOpt = None,
    cpus_per_site: _CpusPerSiteOpt = 1,
    gpus_per_site: _GpusPerSiteOpt = 0.0,
    timeout: _TimeoutOpt = 3600.0,
    ray_address: _RayAddressOpt = None,
    via_dicom: _ViaDicomOpt = False,
    site_policy: _SitePolicyOpt = None,
) -> None:
    """Run N virtual hospitals on Flower's simulation engine and report per round.

    Splits the dataset's training images into site datasets (IID or Dirichlet label
    skew), starts a local simulation SuperLink, runs the medfed ServerApp and ClientApps
    with `flwr run`, shows progress per round, prints the global validation accuracy and
    AUROC per round, says which round's global model validated best at the sites, and
    leaves everything in the run directory: config.json, rounds.jsonl, checkpoints/,
    final_model.pt, best_model.pt (that best round's model), sites/.

    Example: medfed simulate --sites 5 --partition iid --rounds 5 --set local-epochs=2

    Run-config values, highest precedence first: --sites / --rounds / --seed and --set
    KEY=VALUE (an option and a --set of its key that disagree are an error), then the
    --config file (an option that overrides one of its values says so), then the app's
    defaults. An option left out overrides nothing.

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
    try:
        new = _plan_new_run(
            config=config,
            set_=set_ or [],
            sites=sites,
            rounds=rounds,
            seed=seed,
            model=model,
            task=task_name,
            gpus_per_site=gpus_per_site,
            dataset=dataset,
            partition=partition,
            alpha=alpha,
            data_dir=data_dir,
            run_dir=run_dir,
            site_policy=site_policy,
        )
    except MedfedError as exc:
        raise fail(exc) from None
    previous = _claim_run_dir(new.out, force=force)
    console.print(
        f"[bold]medfed simulate[/]: {new.sites} sites, {partition}"
        f"{f' alpha={alpha}' if partition == 'dirichlet' else ''}, "
        f"{new.rounds} rounds, model {new.run.model} -> {new.out}"
    )
    _make_sites(new, data_dir=data_dir, via_dicom=via_dicom, previous=previous)
    _launch(
        new,
        previous=previous,
        cpus_per_site=cpus_per_site,
        gpus_per_site=gpus_per_site,
        timeout=timeout,
        ray_address=ray_address,
    )

    from common.fsutil import discard

    discard(previous)  # the new run is complete: the replaced one goes
    _report(new.out, new.eval_data)


@dataclass(frozen=True)
class _NewRun:
    """A new ``medfed simulate`` run, resolved and checked before any work.

    Attributes
    ----------
    run : RunConfig
        The run config the ServerApp and ClientApps get.
    out : pathlib.Path
        The (absolute) run directory.
    sites, rounds, seed : int
        Virtual hospitals, federated rounds and seed, after precedence.
    dataset : str
        The public dataset that is federated.
    npz : pathlib.Path or None
        Its MedMNIST file; None for CHASE_DB1.
    plan : SplitPlan
        How MedMNIST training data is split into sites.
    eval_data : pathlib.Path
        What ``medfed evaluate --data`` checks the run's models on.
    """

    run: RunConfig
    out: Path
    sites: int
    rounds: int
    seed: int
    dataset: str
    npz: Path | None
    plan: SplitPlan
    eval_data: Path


def _resolve_run_keys(
    *,
    config: Path | None,
    set_: list[str],
    sites: int | None,
    rounds: int | None,
    seed: int | None,
    model: str | None,
    task: str | None,
) -> tuple[dict[str, Any], int, int, int]:
    """Return the run-config keys of a new run and its sites, rounds and seed.

    Applies the precedence of :func:`_run_config_keys` to ``--config``, ``--set`` and
    ``--sites`` / ``--rounds`` / ``--seed``, then adds ``--model`` / ``--task``.

    Raises
    ------
    ConfigError
        On a bad ``--set``, a conflicting option or a non-integer key.
    """
    overrides = _run_config_keys(
        file_keys=load_config_file(config) if config is not None else {},
        set_keys=_parse_set(set_),
        options={"min-sites": ("--sites", sites), "num-server-rounds": ("--rounds", rounds),
                 "seed": ("--seed", seed)},
        config=config,
    )  # fmt: skip
    defaults = RunConfig()
    sites = _int_key(overrides, "min-sites", defaults.federation.min_sites)
    rounds = _int_key(overrides, "num-server-rounds", defaults.num_server_rounds)
    seed = _int_key(overrides, "seed", defaults.seed)
    overrides |= _task_overrides(overrides, model=model, task=task)
    return overrides, sites, rounds, seed


def _plan_new_run(
    *,
    config: Path | None,
    set_: list[str],
    sites: int | None,
    rounds: int | None,
    seed: int | None,
    model: str | None,
    task: str | None,
    gpus_per_site: float,
    dataset: str | None,
    partition: str,
    alpha: float,
    data_dir: Path | None,
    run_dir: Path | None,
    site_policy: Path | None,
) -> _NewRun:
    """Resolve a new run's config, dataset and directory, failing before any work.

    Raises
    ------
    MedfedError
        On a bad option, run config, dataset, site policy or unwritable run directory.
    """
    from simulation.data.chase import DATASET as CHASE
    from simulation.data.datasets import MEDMNIST, medmnist_path
    from simulation.data.sites import GLOBAL_EVAL, SplitPlan

    overrides, sites, rounds, seed = _resolve_run_keys(
        config=config, set_=set_, sites=sites, rounds=rounds, seed=seed, model=model, task=task
    )
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
    eval_data = npz if npz is not None else out / "sites" / GLOBAL_EVAL
    return _NewRun(run, out, sites, rounds, seed, dataset, npz, plan, eval_data)


def _claim_run_dir(out: Path, *, force: bool) -> Path | None:
    """Make ``out`` the new run's directory; return where a replaced run is kept.

    An existing run is never overwritten: with ``--force`` a medfed run is moved aside
    until the new one completes. Returns None when nothing was moved aside.
    """
    from common.fsutil import marker_kind, set_aside, write_marker
    from server.app import RUN_KIND, why_not_run_dir

    try:
        previous = set_aside(
            out, overwrite=force, why_not_ours=why_not_run_dir, what="run directory"
        )
    except MedfedError as exc:
        raise fail(exc) from None
    if previous is not None:
        console.print(f"previous run moved aside to {previous} until this one completes")
    out.mkdir(parents=True, exist_ok=True)
    if marker_kind(out) != RUN_KIND:
        write_marker(out, RUN_KIND)  # out is new or empty: medfed's run directory
    return previous


def _make_sites(
    new: _NewRun, *, data_dir: Path | None, via_dicom: bool, previous: Path | None
) -> None:
    """Write the new run's virtual site datasets under ``<run>/sites`` and list them."""
    from simulation.data.chase import ChasePlan, create_chase_sites
    from simulation.data.datasets import MEDMNIST, resolve_data_dir
    from simulation.data.sites import create_virtual_sites

    out = new.out
    try:
        if new.npz is None:  # CHASE_DB1 segmentation: by-child split, simulation/data/chase.py
            manifests = create_chase_sites(
                resolve_data_dir(data_dir),
                out / "sites",
                plan=ChasePlan(num_sites=new.sites, seed=new.seed),
            )
        else:
            manifests = create_virtual_sites(
                new.npz,
                out / "sites",
                plan=new.plan,
                label_names=MEDMNIST[new.dataset].label_names,
                dataset_name=new.dataset,
                via_dicom=out / "dicom-exports" if via_dicom else None,
            )
    except MedfedError as exc:
        _kept(previous)
        raise fail(exc) from None
    for i, m in enumerate(manifests):
        counts = m["splits"]["train"]["label_counts"]
        console.print(
            f"  site-{i}: {m['splits']['train']['count']} train / "
            f"{m['splits']['val']['count']} val images, labels {counts}"
        )


def _launch(
    new: _NewRun,
    *,
    previous: Path | None,
    cpus_per_site: int,
    gpus_per_site: float,
    timeout: float,
    ray_address: str | None,
) -> None:
    """Run the new run's rounds on Flower's simulation engine, with a progress bar."""
    from simulation.launch.engine import run_simulation
    from simulation.research.summary import round_progress

    verbose = logging.getLogger().level <= logging.DEBUG
    with round_progress(console, new.rounds, echo_all=verbose) as on_line:
        try:
            run_simulation(
                run_dir=new.out,
                run_config=new.run.to_run_config(),
                num_sites=new.sites,
                cpus_per_site=cpus_per_site,
                gpus_per_site=gpus_per_site,
                on_line=on_line,
                timeout=timeout,
                ray_address=ray_address,
            )
        except MedfedError as exc:
            _kept(previous)
            raise fail(exc) from None


def _report(out: Path, eval_data: Path) -> None:
    """Print the finished run's tables and where its models are."""
    from server.selection import BEST_MODEL
    from simulation.research.summary import best_model_line, read_rounds, site_table, summary_table

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
    from simulation.data.sites import GLOBAL_EVAL
    from simulation.launch.engine import run_simulation
    from simulation.research.summary import round_progress

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
        sites = run.federation.min_sites
        missing = [i for i in range(sites) if not (out / "sites" / f"site-{i}").is_dir()]
        if missing:
            raise ConfigError(
                f"--resume {run_dir}: its virtual sites {missing} are missing from "
                f"{out / 'sites'}; the run cannot go on without them."
            )
    except MedfedError as exc:
        raise fail(exc) from None
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
            raise fail(exc) from None
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


_CheckpointOpt = Annotated[
    Path, typer.Option(help="A medfed checkpoint (final_model.pt) or `medfed export` model.ts.")
]
_EvalDataOpt = Annotated[
    Path,
    typer.Option(help="A MedMNIST-format .npz file, or a site dataset directory (any task)."),
]
_ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        help="Binary classifiers: predict class 1 when P(class 1) >= this. Default: the "
        "checkpoint's operating point (chosen on the sites' pooled validation), else 0.5.",
        min=0.0,
        max=1.0,
    ),
]
_AtDefaultOpt = Annotated[
    bool,
    typer.Option(
        "--at-default",
        help="Binary classifiers: also report the metrics at the default threshold 0.5.",
    ),
]
_BalancedOpt = Annotated[
    bool,
    typer.Option(
        "--balanced",
        help="Classification: evaluate on a class-balanced resample of the split (every "
        "class cut to the rarest class's count, seeded): a stand-in for a hospital "
        "whose prevalence differs.",
    ),
]


def evaluate(
    checkpoint: _CheckpointOpt,
    data: _EvalDataOpt,
    split: Annotated[str, typer.Option(help="Split of the file: train, val or test.")] = "val",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    threshold: _ThresholdOpt = None,
    at_default: _AtDefaultOpt = False,
    balanced: _BalancedOpt = False,
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
    from common.export import load_model_file

    try:
        ckpt, model = load_model_file(checkpoint)  # a checkpoint or a `medfed export` file
        images, labels = _eval_arrays(ckpt, data, split, balanced=balanced)
        metrics, source, at_half = _score(
            ckpt, model, images, labels, threshold=threshold, at_default=at_default, device=device
        )
    except MedfedError as exc:
        raise fail(exc) from None

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
    if source is not None:  # a binary classifier
        result["threshold-source"] = source
    result |= _clean(metrics)
    if at_half is not None:
        result["at-0.5"] = _clean(at_half)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


def _eval_arrays(ckpt: Any, data: Path, split: str, *, balanced: bool) -> tuple[Any, Any]:
    """Return the model-ready images and labels ``medfed evaluate`` scores.

    ``data`` is a site dataset directory (checked against the checkpoint's task) or a
    MedMNIST ``.npz`` file; ``balanced`` keeps a seeded class-balanced resample.
    """
    from common.site_dataset import SiteDataset
    from common.tasks import get_task
    from simulation.data.datasets import load_medmnist_split, to_model_images

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
    return images, labels


def _score(
    ckpt: Any,
    model: Any,
    images: Any,
    labels: Any,
    *,
    threshold: float | None,
    at_default: bool,
    device: str,
) -> tuple[dict[str, float], str | None, dict[str, float] | None]:
    """Return the metrics of ``model``, the threshold's source and the metrics at 0.5.

    A binary classifier is scored at its decision threshold (:func:`_decision_threshold`);
    the source is None for other models, and the metrics at 0.5 are None unless
    ``at_default`` is given for a binary classifier.
    """
    from common.device import resolve_device
    from common.evaluation import evaluate_binary_at
    from common.tasks import get_task

    binary = ckpt.task != "segmentation" and int(ckpt.model_kwargs.get("num_classes", 0)) == 2
    if not binary:
        metrics = get_task(ckpt.task).evaluate(model, images, labels, device=resolve_device(device))
        return metrics, None, None
    t, source = _decision_threshold(ckpt, threshold)
    wanted = {"chosen": t} | ({"default": 0.5} if at_default else {})
    free, at = evaluate_binary_at(
        model, images, labels, thresholds=wanted, device=resolve_device(device)
    )
    return free | {"threshold": t} | at["chosen"], source, at["default"] if at_default else None


def _clean(values: dict[str, float]) -> dict[str, float | None]:
    """Return ``values`` rounded to 6 decimals, NaN as None (JSON null)."""
    return {k: (None if v != v else round(v, 6)) for k, v in values.items()}


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
    # None means argmax, which decision_threshold gives only for more than two classes
    threshold = 0.5 if decision.threshold is None else float(decision.threshold)
    op = ckpt.operating_point
    if decision.source == "checkpoint" and op:
        return threshold, (
            f"checkpoint operating point ({op['method']}, pooled site validation of round "
            f"{op.get('round', '?')})"
        )
    return threshold, "default 0.5 (the checkpoint has no operating point)"


def download(
    dataset: Annotated[str, typer.Argument(help="pneumoniamnist or breastmnist.")],
    data_dir: Annotated[Path, typer.Option(help="Where to store <dataset>/<dataset>.npz.")],
) -> None:
    """Download an official MedMNIST v2 file (Zenodo) and verify its MD5 checksum."""
    from simulation.data.datasets import download_medmnist

    try:
        path = download_medmnist(dataset, data_dir)
    except MedfedError as exc:
        raise fail(exc) from None
    except OSError as exc:
        raise fail(f"download failed ({exc}); check your internet") from None
    console.print(f"{dataset}: {path} (checksum ok)")


def register(app: typer.Typer) -> None:
    """Add the researcher commands to the root ``medfed`` app."""
    app.command()(simulate)
    app.command()(evaluate)
    app.command()(download)
    from simulation.research.pooled import pooled_baseline

    app.command()(pooled_baseline)
    from simulation.model_cli import register as register_model_commands

    register_model_commands(app)  # medfed explain, medfed export
