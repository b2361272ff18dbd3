"""Hospital commands: ``medfed site keys`` (the SuperNode's authentication key pair)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from client.site.audit_cli import audit_app
from client.site.policy_cli import policy_app
from client.site.serve_cli import register_serve
from common.cli import fail
from common.errors import MedfedError
from common.tls import check_node_key_pair, write_node_keys

console = Console()

site_app = typer.Typer(
    help="Hospital site administration: the site worker, its policy and audit log, SuperNode keys.",
    no_args_is_help=True,
)
site_app.add_typer(policy_app, name="policy")
site_app.add_typer(audit_app, name="audit")


@site_app.command("keys")
def keys(
    out_dir: Annotated[Path, typer.Argument(help="Folder that receives the key pair.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
) -> None:
    """Create this hospital's SuperNode key pair (EC P-384, OpenSSH format).

    Writes OUT_DIR/supernode.key (private, 0600: pass it to `flower-supernode
    --auth-supernode-private-key`) and OUT_DIR/supernode.key.pub (send it to the
    coordinator, who runs `flwr supernode register supernode.key.pub <connection>`).
    OUT_DIR is created with mode 0700 if new; an existing one must be yours, not
    writable by group or others, and not a symbolic link.
    """
    try:
        paths = write_node_keys(out_dir, force=force)
        check_node_key_pair(paths.private_key, paths.public_key)
    except MedfedError as exc:
        raise fail(exc) from None
    console.print(f"private key: {paths.private_key}  (stays at the hospital)")
    console.print(f"public key:  {paths.public_key}  (send to the coordinator)")


register_serve(site_app)


def register(app: typer.Typer) -> None:
    """Add the ``site`` sub-app to the root ``medfed`` app."""
    app.add_typer(site_app, name="site")
