"""Coordinator commands: ``medfed certs`` (development CA + SuperLink certificate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.cli import fail
from common.errors import MedfedError
from common.tls import check_server_files, write_dev_certificates

console = Console()


def certs(
    out_dir: Annotated[Path, typer.Argument(help="Folder that receives the files.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="DNS name clients use for the SuperLink (repeatable)."),
    ] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="IP address clients use for the SuperLink (repeatable)."),
    ] = None,
    site: Annotated[
        list[str] | None,
        typer.Option(
            "--site",
            help="SuperNode host name needing a Runtime-API certificate, e.g. supernode-1.",
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Create a development CA and a SuperLink TLS certificate (EC P-384).

    Writes OUT_DIR/ca.crt, ca.key (0600), server.pem, server.key (0600) and, per --site,
    <site>.pem/<site>.key. OUT_DIR is created with mode 0700 if new; an existing one must
    be yours and not writable by group or others, and must not be a symbolic link. A
    --site name is 1-63 letters, digits, '.', '_' or '-' (no '/' or '..'). The
    certificate names every --host/--ip plus localhost, 127.0.0.1 and ::1 (Flower's
    SuperExec reaches the SuperLink on 127.0.0.1) and the compose service name
    `superlink`. Give ca.crt to every hospital and to `flwr`.
    """
    hosts = list(dict.fromkeys([*(host or []), "superlink"]))
    try:
        paths = write_dev_certificates(
            out_dir, hosts=hosts, ips=ip or [], sites=site or [], valid_days=days, force=force
        )
        check_server_files(
            paths.server_cert, paths.server_key, paths.ca_cert, names=[*hosts, *(ip or [])]
        )
    except MedfedError as exc:
        raise fail(exc) from None
    console.print(f"CA certificate:     {paths.ca_cert}  (give to hospitals and flwr)")
    console.print(f"CA key:             {paths.ca_key}  (keep offline)")
    console.print(f"SuperLink cert/key: {paths.server_cert} / {paths.server_key}")
    for s in dict.fromkeys(site or []):  # names checked by write_dev_certificates
        console.print(f"Runtime API cert:   {out_dir / (s + '.pem')} / {out_dir / (s + '.key')}")


def register(app: typer.Typer) -> None:
    """Add the coordinator commands to the root ``medfed`` app."""
    app.command()(certs)
