"""``medfed site audit``: verify and show the site's hash-chained audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from client.site.audit import RESERVED, AuditChainError, AuditError, AuditLog
from common.cli import fail
from common.errors import ExitCode

console = Console()

audit_app = typer.Typer(
    help="The site's audit log: verify its hash chain, or show its entries.",
    no_args_is_help=True,
)

StateDir = Annotated[Path, typer.Argument(help="The site's state dir (holds audit.jsonl).")]


def _existing(state_dir: Path) -> Path:
    if not state_dir.is_dir():
        raise fail(f"no state dir at {state_dir}")
    return state_dir


def summarize(entry: dict[str, Any], *, width: int = 80) -> str:
    """Return ``key=value`` pairs of an entry's own fields, cut to ``width`` characters.

    Parameters
    ----------
    entry : dict
        One audit entry.
    width : int
        Maximum length of the summary.
    """
    parts = []
    for key in sorted(set(entry) - RESERVED):
        value = entry[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if key == "sha256" and isinstance(value, str):
            text = value[:12]
        parts.append(f"{key}={text}")
    line = " ".join(parts)
    return line if len(line) <= width else line[: width - 3] + "..."


@audit_app.command()
def verify(state_dir: StateDir) -> None:
    """Verify the audit log's hash chain and the privacy ledger's anchor in it.

    Exits 0 on an intact chain whose last ledger anchor matches the ledger; exits 1
    naming the first bad entry (edited, reordered, deleted, truncated) or saying how the
    ledger differs from its anchor (rolled back, replaced, deleted); exits 2 on a usage
    error.
    """
    log_ = AuditLog(_existing(state_dir))
    try:
        count = log_.verify()
    except AuditChainError as exc:
        raise fail(exc, heading="audit log broken") from None
    from client.privacy import PrivacyError, PrivacyLedger  # torch: only when needed

    try:
        PrivacyLedger(state_dir).read()
    except PrivacyError as exc:
        raise fail(
            exc, code=ExitCode.FINDINGS, heading="privacy ledger does not match the audit log"
        ) from None
    console.print(f"audit log intact: {count} entries; the privacy ledger matches its anchor")


@audit_app.command()
def show(
    state_dir: StateDir,
    last: Annotated[int, typer.Option(help="Show only the last N entries (0: all).")] = 0,
) -> None:
    """Print the audit log as a table (seq, time, event, fields), then verify it.

    A damaged log is still shown (lines that do not parse are left out) and the command
    exits 1 naming the first bad entry.
    """
    log_ = AuditLog(_existing(state_dir))
    if last < 0:
        raise fail("--last must be >= 0")
    try:
        entries = log_.entries(verify=False)
    except AuditError as exc:
        raise fail(exc) from None
    table = Table(title=f"audit log: {state_dir}")
    for col, justify in (("seq", "right"), ("time", "left"), ("event", "left"), ("fields", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for entry in entries[-last:] if last else entries:
        table.add_row(str(entry["seq"]), str(entry["time"]), str(entry["event"]), summarize(entry))
    console.print(table)
    try:
        count = log_.verify()
    except AuditChainError as exc:
        raise fail(exc, heading="audit log broken") from None
    console.print(f"chain intact: {count} entries")


def register_audit(site_app: typer.Typer) -> None:
    """Add ``medfed site audit`` (verify, show) to the ``site`` sub-app."""
    site_app.add_typer(audit_app, name="audit")
