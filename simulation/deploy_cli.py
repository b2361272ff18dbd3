"""``medfed deploy-local``: a coordinator and three hospitals as real processes over TLS."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.cli import fail
from common.config import RunConfig, check_writable_dir
from common.errors import ExitCode, FederationError, MedfedError

log = logging.getLogger(__name__)
console = Console()
err_console = Console(stderr=True)


_DeployDirOpt = Annotated[
    Path | None,
    typer.Option(help="Scratch folder (default: runs/deploy-local-<time>)."),
]
_ImagesPerSiteOpt = Annotated[
    int, typer.Option(help="Training images per hospital (a subset keeps it quick).")
]
_DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="Data root (default: $MEDFED_DATA_DIR, then ../shared/data)."),
]
_ForceOpt = Annotated[bool, typer.Option("--force", help="Regenerate certificates and keys.")]


def _print_run_summary(run_dir: Path, deploy_dir: Path, num_pids: int) -> None:
    """Print the round summary and where to look next after a local deployment.

    Parameters
    ----------
    run_dir : Path
        Run directory the federated run wrote.
    deploy_dir : Path
        Deployment scratch folder.
    num_pids : int
        Number of processes that were started (and stopped).
    """
    from simulation.research.summary import best_model_line, read_rounds, summary_table

    history = read_rounds(run_dir)
    console.print(summary_table(history))
    if line := best_model_line(history):
        console.print(line)
    console.print(f"run directory: [bold]{run_dir}[/]; all {num_pids} processes stopped")
    console.print(
        "what each hospital's worker was asked, refused and sent: medfed site audit show "
        f"{deploy_dir / 'volumes' / 'hospital-1-state'} (and -2, -3)"
    )


def deploy_local(
    deploy_dir: _DeployDirOpt = None,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    images_per_site: _ImagesPerSiteOpt = 300,
    min_replies: Annotated[int, typer.Option(help="Quorum of replies per round.")] = 2,
    round_timeout: Annotated[float, typer.Option(help="Seconds a round waits for sites.")] = 300.0,
    dataset: Annotated[str, typer.Option(help="Public dataset to federate.")] = "pneumoniamnist",
    data_dir: _DataDirOpt = None,
    force: _ForceOpt = False,
    timeout: Annotated[float, typer.Option(help="Seconds before the run is stopped.")] = 1800.0,
) -> None:
    """Run a real federation on this machine, from docker-compose.yml's service definitions.

    Generates a development CA, the SuperLink certificate and 3 hospital key pairs,
    prepares 3 site datasets, starts a SuperLink (TLS, node authentication, database),
    registers the 3 keys, starts 3 SuperNodes (each with its own dataset-dir, state-dir
    and site-id) and the SuperExecs, runs `flwr run . medfed-local`, prints the round
    summary and stops every process it started (also on Ctrl-C or failure).
    """
    from simulation.data.datasets import medmnist_path
    from simulation.launch.deploy import (
        SITE_SOURCE,
        default_run_config,
        dicom_path_available,
        local_federation,
        pid_alive,
        prepare_credentials,
        prepare_policies,
        prepare_site_datasets,
    )
    from simulation.launch.processes import sigterm_as_interrupt
    from simulation.research.summary import round_progress

    root = Path(__file__).resolve().parents[1]
    deploy_dir = (
        deploy_dir or root / "runs" / f"deploy-local-{time.strftime('%Y%m%d-%H%M%S')}"
    ).resolve()
    run_dir = deploy_dir / "run"
    if run_dir.exists() or run_dir.is_symlink():  # a re-used deploy dir: never overwrite a run
        run_dir = deploy_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    pids: list[int] = []
    overrides = {
        "num-server-rounds": rounds,
        "min-sites": 3,
        "min-replies": min_replies,
        "round-timeout": round_timeout,
    }
    try:
        # A bad run config or an unwritable folder fails here, before any key, dataset or
        # process exists.
        RunConfig.from_run_config({"run-dir": str(run_dir), **overrides})
        check_writable_dir(deploy_dir, what="deployment folder", option="--deploy-dir")
        npz = medmnist_path(dataset, data_dir)
        console.print(f"deployment folder: [bold]{deploy_dir}[/]")
        prepare_credentials(deploy_dir, num_sites=3, force=force)
        console.print("certificates (CA, SuperLink, 3 Runtime APIs) and 3 site keys: ok")
        sites = prepare_site_datasets(npz, deploy_dir, num_sites=3, images_per_site=images_per_site)
        source = SITE_SOURCE
        if source == "dicom":
            source = "DICOM export -> ingest" if dicom_path_available() else "virtual (fallback)"
        console.print(f"{len(sites)} hospital site datasets ready (source: {source})")
        policies = prepare_policies(deploy_dir, num_sites=3)
        console.print(
            f"{len(policies)} site policies ({policies[0].parent}; edit, then "
            "`medfed site policy check FILE`)"
        )
        run_config = default_run_config(deploy_dir, run_dir, **overrides)
        with sigterm_as_interrupt(), local_federation(deploy_dir) as fed:
            pids = [m.pid for m in fed.group.procs.values()]
            console.print(
                f"SuperLink {fed.superlink.address} (TLS + node auth), "
                f"{len(pids)} processes; 3 site workers and 3 SuperNodes online"
            )
            with round_progress(console, rounds) as on_line:
                rc = fed.run(run_config, on_line=on_line, timeout=timeout)
            pids = [m.pid for m in fed.group.procs.values()]
        if rc != 0 or not (run_dir / "final_model.pt").exists():
            raise FederationError(
                f"the federated run did not finish (flwr run exit code {rc}); see the logs "
                f"in {deploy_dir / 'flwr-home' / 'logs'}"
            )
    except MedfedError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted: all processes stopped[/]")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    finally:
        left = [p for p in pids if pid_alive(p)]
        if left:
            err_console.print(f"[red]processes still alive: {left}[/]")
    _print_run_summary(run_dir, deploy_dir, len(pids))


def register(app: typer.Typer) -> None:
    """Add ``medfed deploy-local`` to the root ``medfed`` app."""
    app.command("deploy-local")(deploy_local)
