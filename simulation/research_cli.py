"""Research commands: ``medfed experiment`` and ``medfed report``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.cli import fail
from common.errors import MedfedError

console = Console()
err_console = Console(stderr=True)


def _fmt(mean: Any, std: Any | None = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{float(mean):.{digits}f}"
    return text if std is None else f"{text} ± {float(std):.{digits}f}"


def results_table(rows: list[dict[str, Any]]) -> Table:
    """Rich table of the ``summary`` rows: accuracy of each arm and the two ratios."""
    table = Table(
        title="medfed experiment: accuracy (mean ± std over seeds)",
        caption="fed/pooled and fed/best-local are ratios of accuracies (1.0 = as good); "
        "best local = the single-site model that scores best on the evaluation sets",
    )
    for col in ("split", "setting", "DP", "seeds", "federated", "pooled", "best local"):
        table.add_column(col, justify="left" if col in ("split", "setting") else "right")
    table.add_column("fed/pooled", justify="right", style="bold")
    table.add_column("fed/best-local", justify="right", style="bold")
    table.add_column("max ε", justify="right")
    for r in rows:
        if r.get("kind") != "summary":
            continue

        def cell(key: str, r: dict[str, Any] = r) -> str:
            # one seed has no spread: show the value alone, not "± 0.000"
            return _fmt(r[key], r[f"{key}-std"] if r["seeds"] > 1 else None)

        table.add_row(
            r["split"],
            r["setting"],
            "on" if r["dp"] else "off",
            str(r["seeds"]),
            cell("federated"),
            cell("pooled"),
            cell("best-local"),
            cell("fed/pooled"),
            cell("fed/best-local"),
            _fmt(r["max-epsilon"], digits=2) if r["dp"] else "-",
        )
    return table


def experiment(
    config: Annotated[Path, typer.Argument(help="Experiment TOML (see bench/experiments/).")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: runs/exp-<name>).")
    ] = None,
    device: Annotated[str, typer.Option(help="Device for pooled/local baselines.")] = "cpu",
    threads: Annotated[
        int,
        typer.Option(help="torch CPU threads for the baselines (1 avoids oversubscription)."),
    ] = 1,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace --out if it holds a previous medfed experiment (never any other "
            "folder); the old one is kept aside until the new one completes.",
        ),
    ] = False,
) -> None:
    """Pooled vs local vs federated training on one task, with equal compute and seeds.

    For every split x seed: trains the pooled (centralised) model, one local model per
    site, and each [[federated]] setting on Flower's simulation engine; writes
    results.csv / results.json with federated/pooled and federated/best-local ratios
    (mean and std over seeds), prints the table, and writes report.html.

    Example: medfed experiment bench/experiments/heart_disease.toml
    """
    import torch

    from common.device import resolve_device
    from common.fsutil import discard, set_aside
    from simulation.research.experiment import (
        ExperimentConfig,
        run_experiment,
        why_not_experiment_dir,
    )
    from simulation.research.report import write_experiment_report

    torch.set_num_threads(max(1, threads))
    previous: Path | None = None
    try:
        cfg = ExperimentConfig.from_toml(config)
        target = (out or Path("runs") / f"exp-{cfg.name}").resolve()
        previous = set_aside(
            target,
            overwrite=force,
            why_not_ours=why_not_experiment_dir,
            what="experiment directory",
        )
        if previous is not None:
            console.print(f"previous experiment moved aside to {previous} until this one completes")
        console.print(
            f"[bold]medfed experiment[/] {cfg.name}: splits {[s.label for s in cfg.splits]}, "
            f"settings {[f.label for f in cfg.federated]}, seeds {cfg.seeds}, "
            f"{cfg.rounds} rounds -> {target}"
        )
        rows = run_experiment(cfg, target, on_progress=console.print, device=resolve_device(device))
        html = write_experiment_report(target)
    except MedfedError as exc:
        err = fail(exc)
        if previous is not None:
            err_console.print(f"the previous experiment is kept at {previous}")
        raise err from None
    discard(previous)  # the new experiment is complete: the replaced one goes
    # a log file is not a terminal: do not squeeze the table into 80 columns
    (console if console.is_terminal else Console(width=150)).print(results_table(rows))
    console.print(f"results: {target / 'results.csv'}, report: {html}")


def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (rounds.jsonl) or experiment directory.")
    ],
) -> None:
    """Write PNG plots and report.html for a finished run (or experiment) directory.

    Run: global and per-site metric vs round, epsilon vs round per site, bytes per
    round, round time breakdown, the config and the per-site data summary. Experiment:
    the results table and the ratio plot, plus a link per federated run.
    """
    from simulation.research.report import write_experiment_report, write_run_report

    try:
        if (run_dir / "results.json").is_file():
            html = write_experiment_report(run_dir)
        else:
            html = write_run_report(run_dir)
    except MedfedError as exc:
        raise fail(exc) from None
    console.print(f"report: {html}")


def register(app: typer.Typer) -> None:
    """Add the research commands to the root ``medfed`` app."""
    app.command()(experiment)
    app.command()(report)
