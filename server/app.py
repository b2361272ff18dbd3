"""The medfed Flower ``ServerApp``: parse config, wait for sites, run the strategy, save.

Runs unchanged on the deployment engine (SuperLink + SuperExec) and the simulation
engine. Everything it writes goes to the run directory (run config ``run-dir``)::

    .medfed-owner          marker: medfed created this run directory (common/fsutil.py)
    config.json            the parsed run config
    rounds.jsonl           one line per round (server/runlog.py)
    checkpoints/round-NNN.pt
    final_model.pt         the global model after the last round
    best_model.pt          the global model of the round that scored best on the sites'
                           aggregated validation (run config 'model-selection-metric';
                           server/selection.py); its 'selected_round' names the round
    resume.pt              what resuming needs, replaced atomically after every round
                           (server/resume.py)
    .run.lock              held by the ServerApp while the run goes on

A run never overwrites another: the ServerApp refuses a run directory that already holds
a run, or a non-empty one medfed did not create for this run (:func:`prepare_run_dir`).
With run config ``resume-from`` it goes on with the run in that directory after its last
finished round instead (:func:`open_run`, server/resume.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import secure_sum
from common.checkpoint import Checkpoint, save_checkpoint
from common.config import RunConfig
from common.device import resolve_device
from common.errors import ConfigError, FederationError
from common.fsutil import marker_kind, write_marker
from common.models import get_model
from common.records import state_to_record
from common.site_dataset import SiteDataset
from common.tasks import get_task
from common.waiting import wait_for_nodes
from server.census import run_census
from server.claims import ClaimRegistry
from server.grid import PromptGrid
from server.quorum import SAMPLE_WAIT_SECONDS, QuorumStrategy
from server.resume import (
    RESUME_FILE,
    ResumableRun,
    ResumeState,
    check_model,
    check_resumable,
    discard_lost_round,
    load_state,
    restore_strategy,
    resumed_config,
    run_lock,
)
from server.runlog import ROUNDS_FILE, EvaluateFn, RecordingStrategy, dp_noise_label
from server.secagg import SecAggGrid
from server.selection import BEST_MODEL, resolve_metric
from server.strategy import build_strategy

log = logging.getLogger(__name__)

app = ServerApp()

FINAL_MODEL = "final_model.pt"
CONFIG_FILE = "config.json"
#: Kind in the run directory's ownership marker (:func:`common.fsutil.write_marker`).
RUN_KIND = "run"
#: What a run leaves in its directory: any of these means a run is (or was) there.
RUN_FILES = (CONFIG_FILE, ROUNDS_FILE, FINAL_MODEL, BEST_MODEL, RESUME_FILE, "checkpoints")


def wait_for_sites(grid: Grid, *, min_sites: int, timeout: float, poll: float = 1.0) -> int:
    """Block until ``min_sites`` SuperNodes are connected, at most ``timeout`` seconds.

    Flower's samplers wait forever; a coordinator wants a bounded wait and a clear error.

    Returns
    -------
    int
        The number of connected sites.

    Raises
    ------
    FederationError
        If fewer than ``min_sites`` connected within ``timeout`` seconds.

    """
    connected = wait_for_nodes(
        lambda: len(list(grid.get_node_ids())),
        at_least=min_sites,
        timeout=timeout,
        poll=poll,
        what="sites",
    )
    if connected < min_sites:
        raise FederationError(
            f"only {connected} of the required {min_sites} sites connected within "
            f"{timeout:.0f} s (run config 'connect-timeout'); check the SuperNodes' "
            "logs and their connection to the SuperLink, or lower 'min-sites'."
        )
    return connected


def _central_evaluation(run: RunConfig) -> EvaluateFn | None:
    """Server-side evaluation on a held-out site dataset, if ``eval-dataset-dir`` is set."""
    if not run.paths.eval_dataset_dir:
        return None
    data = SiteDataset(run.paths.eval_dataset_dir)
    split_name = next((s for s in ("val", "test", "train") if s in data.splits), None)
    if split_name is None:
        raise FederationError(f"eval dataset {run.paths.eval_dataset_dir} has no split")
    get_task(run.task).check_dataset(data, model=run.model, num_classes=run.num_classes)
    split = data.load(split_name)
    device = resolve_device("auto")
    model = get_model(run.model, **run.model_kwargs())

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        metrics = get_task(run.task).evaluate(
            model,
            split.images,
            split.labels,
            batch_size=run.evaluation.batch_size,
            device=device,
        )
        log.info(
            "round %d global %s: %s",
            server_round,
            split_name,
            ", ".join(f"{k} {metrics[k]:.4f}" for k in get_task(run.task).headline),
        )
        return MetricRecord(dict(metrics.items()))

    return evaluate


def resolve_run_dir(run: RunConfig, run_id: int) -> Path:
    """``run-dir`` from the run config, or ``./runs/run-<run_id>``."""
    return Path(run.paths.run_dir) if run.paths.run_dir else Path.cwd() / "runs" / f"run-{run_id}"


def why_not_run_dir(path: Path) -> str | None:
    """Return ``None`` when ``path`` is provably a medfed run directory, else why not.

    Proof: medfed's ownership marker of kind :data:`RUN_KIND` (written when medfed
    creates a run directory), or, for runs from before the marker, both ``config.json``
    and ``rounds.jsonl``. An empty directory holds nothing to lose.
    """
    if path.is_symlink() or not path.is_dir():
        return "it is not a directory"
    if not any(path.iterdir()) or marker_kind(path) == RUN_KIND:
        return None
    if (path / CONFIG_FILE).is_file() and (path / ROUNDS_FILE).is_file():
        return None
    return "it is not a medfed run directory (no medfed marker, no config.json + rounds.jsonl)"


def prepare_run_dir(run_dir: Path, config: Mapping[str, Any]) -> None:
    """Create (or take) the run directory, mark it as medfed's and write ``config.json``.

    A run directory is new, empty, or one medfed created for this run and marked (as
    ``medfed simulate`` does before starting the engine). Nothing in it is overwritten:
    ``config.json`` is created exclusively.

    Parameters
    ----------
    run_dir : pathlib.Path
        The run directory.
    config : Mapping
        The run config, written to ``config.json``.

    Raises
    ------
    ConfigError
        If ``run_dir`` already holds a run (``config.json``, ``rounds.jsonl``,
        ``final_model.pt``, ``best_model.pt`` or ``checkpoints/``), or is a non-empty
        directory medfed did not create for a run.

    """
    fix = (
        "medfed never overwrites a run: set run config 'run-dir' to a new directory "
        "(`medfed simulate` picks a fresh runs/sim-<time>, and its --force replaces a "
        "previous medfed run)."
    )
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise ConfigError(f"run-dir {run_dir} is not a directory. {fix}")
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        raise ConfigError(f"run-dir {run_dir} already holds a run ({', '.join(held)}). {fix}")
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    if not fresh and marker_kind(run_dir) != RUN_KIND:
        raise ConfigError(
            f"run-dir {run_dir} is a non-empty directory medfed did not create for a run. {fix}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        write_marker(run_dir, RUN_KIND)
    try:
        with (run_dir / CONFIG_FILE).open("x") as fh:  # exclusive: never overwrite
            fh.write(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    except FileExistsError:
        raise ConfigError(f"run-dir {run_dir} already holds a run (config.json). {fix}") from None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of the configured strategy, or resume a run.

    With run config ``resume-from`` (a run directory), the run in it goes on after its
    last finished round (server/resume.py).
    """
    run = RunConfig.from_run_config(context.run_config)
    with contextlib.ExitStack() as stack:  # holds the run directory's lock to the end
        run, run_dir, start = open_run(run, context.run_id, stack)
        log.info("run %s: writing logs and checkpoints to %s", context.run_id, run_dir)
        _federate(grid, run, run_dir, start)


def open_run(
    run: RunConfig, run_id: int, stack: contextlib.ExitStack
) -> tuple[RunConfig, Path, ResumeState | None]:
    """Prepare a new run directory, or open the run to resume; lock it for the run.

    Parameters
    ----------
    run : RunConfig
        The run config; ``resume-from`` selects a run to resume.
    run_id : int
        Flower's run id (names the default run directory).
    stack : contextlib.ExitStack
        Receives the run directory's lock (:func:`server.resume.run_lock`).

    Returns
    -------
    tuple[RunConfig, pathlib.Path, ResumeState or None]
        The config to run (a resumed run's own, :func:`server.resume.resumed_config`),
        the run directory and the resume state (None: start at round 0).

    Raises
    ------
    ConfigError
        Before any round, if the run directory cannot take a new run
        (:func:`prepare_run_dir`), or ``resume-from`` is not a medfed run, is finished,
        is still running, has a corrupt resume state or another model or strategy.

    """
    if not run.paths.resume_from:
        run_dir = resolve_run_dir(run, run_id)
        prepare_run_dir(run_dir, run.to_run_config())
        stack.enter_context(run_lock(run_dir))
        return run, run_dir, None
    run_dir = Path(run.paths.resume_from).resolve()
    if run.paths.run_dir and Path(run.paths.run_dir).resolve() != run_dir:
        raise ConfigError(
            f"run config 'resume-from'={run.paths.resume_from!r} and "
            f"'run-dir'={run.paths.run_dir!r} name different directories; a resumed run goes "
            "on in its own directory: drop 'run-dir'."
        )
    if (why := why_not_run_dir(run_dir)) is not None:
        raise ConfigError(
            f"run config 'resume-from'={run.paths.resume_from!r} cannot be resumed: {why}. "
            "Give the directory of a medfed run (the one that holds its config.json and "
            "rounds.jsonl)."
        )
    stack.enter_context(run_lock(run_dir))
    start = load_state(run_dir)
    check_resumable(run_dir, start)
    if start is None:  # stopped before its first round: it starts over, with its own config
        try:
            saved = json.loads((run_dir / CONFIG_FILE).read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{run_dir / CONFIG_FILE} cannot be read ({exc}); start a new run"
            ) from None
        resumed = resumed_config(saved, run, run_dir=run_dir)
        log.warning("the run in %s stopped before its first round: it starts over", run_dir)
    else:
        resumed = resumed_config(start.run_config, run, run_dir=run_dir)
        log.info("resuming the run in %s after round %d", run_dir, start.round)
    discard_lost_round(run_dir, start.round if start is not None else 0)
    return resumed, run_dir, start


def _federate(grid: Grid, run: RunConfig, run_dir: Path, start: ResumeState | None) -> None:
    """Run the rounds of ``run`` (after ``start.round`` when resuming) and save the models."""
    central = _central_evaluation(run)  # fail on a bad eval dataset before any round
    torch.manual_seed(run.seed)
    model = get_model(run.model, **run.model_kwargs())
    meta = _checkpoint_meta(run)
    inner = build_strategy(run)
    if start is not None:  # a resumed run's state must fit before anything is rewritten
        check_model(start, model)
        restore_strategy(inner, start.strategy, expected=start.arrays)
    bounded = QuorumStrategy(
        inner,
        min_replies=run.federation.min_replies,
        min_sites=run.federation.min_sites,
        sample_timeout=min(run.federation.connect_timeout, SAMPLE_WAIT_SECONDS),
        # evaluate-in-train: the sites validate each global model inside the next train
        # message; only the final model needs its own evaluate exchange.
        evaluate_rounds=frozenset({run.num_server_rounds}) if run.evaluation.in_train else None,
    )
    dp_noise = dp_noise_label(dp_enabled=run.dp.enabled, reproducible=run.dp.reproducible_noise)
    if run.dp.enabled and run.dp.reproducible_noise:
        log.warning(
            "dp.reproducible-noise=true: DP noise is seeded from the run config; this run "
            "is NOT PRIVATE (simulation research only; real sites refuse it)"
        )
    # One registry of the sites' num-examples claims for both aggregation paths
    # (server/claims.py): a site may not weigh more than it registered.
    claims = ClaimRegistry(run.federation.max_site_examples)
    strategy = RecordingStrategy(
        bounded,
        run_dir=run_dir,
        checkpoint_meta=meta,
        dp_noise=dp_noise,
        selection_metric=resolve_metric(run),
        operating_point=run.operating_point.method,
        target_sensitivity=run.operating_point.sensitivity,
        claims=claims,
    )
    if start is not None:
        try:
            strategy.restore(
                start.recording,
                arrays=ArrayRecord(start.arrays),
                initial_arrays=state_to_record(model),
            )
        except ValueError as exc:
            raise ConfigError(
                f"the resume state in {run_dir} is corrupt ({exc}); restore the run directory "
                "from a backup or start a new run."
            ) from None

    connected = wait_for_sites(
        grid, min_sites=run.federation.min_sites, timeout=run.federation.connect_timeout
    )
    log.info("%d sites connected; starting %d rounds", connected, run.num_server_rounds)
    grid = _round_grid(grid, run, run_dir, claims)
    if run.class_weight_source() == "federation":
        # The census before round 1: the federation's label counts, summed over the
        # sites (under SecAgg+ when on) and sent to every training round.
        counts = run_census(
            grid,
            initial_arrays=state_to_record(model),
            min_replies=run.federation.min_replies,
            timeout=run.federation.round_timeout,
        )
        strategy.extra_train_config[secure_sum.FEDERATION_COUNTS_KEY] = counts.tolist()
    # Flower's loop over the rounds left, committing the resume state after each.
    rounds = ResumableRun(
        run_dir=run_dir,
        run=run,
        strategy=strategy,
        inner=inner,
        recording=strategy.resume_state,
        start=start,
    )
    final_arrays, final_metrics = rounds.run_rounds(
        grid,
        initial_arrays=state_to_record(model),
        evaluate=strategy.make_evaluate_fn(central),
        timeout=run.federation.round_timeout,
    )
    final_op = strategy.operating_point_of(run.num_server_rounds)
    save_checkpoint(
        run_dir / FINAL_MODEL,
        Checkpoint(
            state_dict=final_arrays.to_torch_state_dict(),
            round=run.num_server_rounds,
            metrics=dict(final_metrics),
            operating_point=None if final_op is None else final_op.as_dict(),
            **meta,
        ),
    )
    log.info("final global model saved to %s", run_dir / FINAL_MODEL)
    _log_selection(strategy, run_dir)


def _checkpoint_meta(run: RunConfig) -> dict[str, Any]:
    """Return what every checkpoint of the run records besides weights, round and metrics."""
    return {
        "model": run.model,
        "model_kwargs": run.model_kwargs(),
        "task": run.task,
        "run_config": run.to_run_config(),
        # class names from the coordinator's held-out dataset, when it has one (the
        # sites' manifests never leave them); explain and export print them
        "label_names": SiteDataset(run.paths.eval_dataset_dir).label_names
        if run.paths.eval_dataset_dir
        else [],
    }


def _round_grid(grid: Grid, run: RunConfig, run_dir: Path, claims: ClaimRegistry) -> Grid:
    """Wrap Flower's grid for the rounds: prompt replies, and SecAgg+ when the run asks."""
    # Collect replies every 0.1 s instead of Flower's 3 s (server/grid.py).
    grid = PromptGrid(grid)
    if run.secagg.enabled:
        # SecAgg+: train messages run the four-stage protocol; the strategy sees only the
        # unmasked weighted mean (server/secagg.py).
        grid = SecAggGrid(
            grid,
            params=run.secagg,
            run_dir=run_dir,
            claims=claims,
            # the final model's validation, too, sums the score histograms securely
            secure_validation=secure_sum.SCORE_HISTOGRAM in secure_sum.spec(run),
        )
        log.info("secure aggregation on: the coordinator sees only the sum of updates")
    return grid


def _log_selection(strategy: RecordingStrategy, run_dir: Path) -> None:
    """Say which round's model ``best_model.pt`` is, or why there is none."""
    best = strategy.best
    if best is None:
        log.warning(
            "no best model: no round's global model has an aggregated %s (did the sites' "
            "policies refuse evaluation?); only %s was written",
            strategy.selection_metric,
            FINAL_MODEL,
        )
        return
    log.info(
        "best model: round %d (%s %.4f) -> %s",
        best.round,
        best.metric,
        best.value,
        run_dir / BEST_MODEL,
    )
    op = strategy.operating_point_of(best.round)
    if op is not None:
        log.info(
            "operating point (%s, pooled validation of %d images): threshold %.2f, "
            "sensitivity %.3f, specificity %.3f",
            op.method,
            round(op.validation_examples),
            op.threshold,
            op.sensitivity,
            op.specificity,
        )
