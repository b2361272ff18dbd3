"""``medfed site serve``: start the hospital's site worker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.cli import fail
from common.errors import MedfedError

console = Console(stderr=True)
log = logging.getLogger(__name__)


def serve(
    policy: Annotated[
        Path,
        typer.Option(
            "--policy",
            help="The hospital's site policy TOML (write one with `medfed site policy init`).",
        ),
    ],
    dataset_dir: Annotated[
        Path,
        typer.Option("--dataset-dir", help="The site dataset written by `medfed ingest`."),
    ],
    state_dir: Annotated[
        Path,
        typer.Option(
            "--state-dir",
            help="The worker's own state (privacy ledger, audit log); created 0700.",
        ),
    ],
    socket: Annotated[
        Path,
        typer.Option(
            "--socket",
            help="Unix socket for the relay; give the same path to the SuperNode as node "
            "config site-worker='PATH'.",
        ),
    ],
    device: Annotated[
        str, typer.Option("--device", help="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    ] = "auto",
    site_id: Annotated[
        str, typer.Option("--site-id", help="A name for this site's own logs.")
    ] = "",
    group_access: Annotated[
        bool,
        typer.Option(
            "--group-access/--owner-only",
            help="Socket mode 0660 (the relay runs as another user of the socket's group) "
            "or 0600 (same user).",
        ),
    ] = False,
) -> None:
    r"""Run the site worker: the only process at the hospital that touches patient data.

    It reads the site dataset, trains with DP-SGD under the site policy, answers the
    SecAgg+ stages, keeps the privacy ledger and a hash-chained audit log in --state-dir,
    and replies only with what may leave the site. The SuperNode's ClientApp (the
    coordinator's code) relays messages to it over --socket and sees nothing else.

    Example:

        medfed site serve --policy /etc/medfed/site-policy.toml \\
            --dataset-dir /data/site --state-dir /var/lib/medfed \\
            --socket /run/medfed/worker.sock

        flower-supernode ... --node-config "site-worker='/run/medfed/worker.sock'"

    Stops cleanly on SIGTERM/SIGINT and removes its socket.
    """
    from client.site.policy import SitePolicy
    from client.site.worker import SiteWorker, WorkerConfig, serve_forever

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = WorkerConfig(
            dataset_dir=dataset_dir,
            state_dir=state_dir,
            socket=socket,
            device=device,
            site_id=site_id,
            socket_mode=0o660 if group_access else 0o600,
        )
        worker = SiteWorker(config, SitePolicy.load(policy))
        serve_forever(worker)
    except MedfedError as exc:
        raise fail(exc) from None


def register_serve(site_app: typer.Typer) -> None:
    """Add ``serve`` to the ``medfed site`` sub-app."""
    site_app.command("serve")(serve)
