"""``medfed site policy``: write, show and check the hospital's site policy file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.site.policy import SECTIONS, SitePolicy, write_default_policy
from common.cli import fail
from common.errors import MedfedError

policy_app = typer.Typer(
    help=(
        "The site policy: one TOML file this hospital owns that bounds what any coordinator "
        "may ask of the site (epsilon ceiling, noise floor, DP and secure aggregation "
        "required, allowed models, tasks, projects and reply metrics, evaluation limits). "
        "The site worker reads it (`medfed site serve --policy FILE`) and refuses every "
        "request outside it before any work.\n\n"
        "Start with `medfed site policy init FILE`, edit it, then `medfed site policy "
        "check FILE`."
    ),
    no_args_is_help=True,
)

PathArg = Annotated[
    Path,
    typer.Argument(help="The site policy file (TOML), e.g. /etc/medfed/site-policy.toml."),
]


def _out() -> Console:
    return Console()


def _load_or_exit(path: Path) -> SitePolicy:
    try:
        return SitePolicy.load(path)
    except MedfedError as exc:
        raise fail(exc) from None


@policy_app.command("init")
def init(path: PathArg) -> None:
    """Write a commented default site policy to PATH (never overwrites).

    The defaults are safe for a hospital: DP-SGD and secure aggregation required,
    cumulative epsilon at most 10 per dataset, noise multiplier at least 0.5, at least 3
    sites per secure aggregate, at most 50 evaluations per run. Every key carries a
    comment saying what it protects against. The file is created with mode 0640; an
    existing file or link at PATH is refused.
    """
    try:
        written = write_default_policy(path)
    except MedfedError as exc:
        raise fail(exc) from None
    out = _out()
    out.print(f"wrote the default site policy to {written}", markup=False, highlight=False)
    out.print(f"digest: {SitePolicy.default().digest()}", highlight=False)
    out.print(
        "next:\n"
        "  1. edit [training] allowed-projects: list the studies this hospital has "
        'approved (["*"] lets any project in)\n'
        "  2. review [privacy] max-epsilon and min-noise-multiplier with your data "
        "protection officer\n"
        "  3. narrow [training] allowed-models / allowed-tasks to what you reviewed\n"
        f"  4. validate: medfed site policy check {written}\n"
        f"  5. start the worker: medfed site serve --policy {written} ...",
        markup=False,
        highlight=False,
    )


@policy_app.command("show")
def show(
    path: PathArg,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the policy and digest as JSON.")
    ] = False,
) -> None:
    """Show the effective policy in PATH (absent keys at their defaults) and its digest.

    The digest (SHA-256 of the canonical form) is what the site's audit log records for
    every decision, so an audit can tell which policy allowed or refused a request.
    Exit code 2 if the file is invalid.
    """
    policy = _load_or_exit(path)
    out = _out()
    if as_json:
        body: dict[str, Any] = {"policy": policy.to_dict(), "digest": policy.digest()}
        out.print_json(json.dumps(body))
        return
    table = Table(
        title=escape(f"site policy {path}"),
        caption="what each key protects against: see its comment in the default file "
        "(medfed site policy init)",
    )
    table.add_column("section", no_wrap=True)
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    data = policy.to_dict()
    for section in SECTIONS:
        for key, value in data[section].items():
            table.add_row(section, key, escape(_display(key, value)))
    out.print(table)
    out.print(f"digest: {policy.digest()}", highlight=False)


def _display(key: str, value: Any) -> str:
    if value is None and key == "delta":
        return "0.1 / N (default)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "\n".join(value)
    return str(value)


@policy_app.command("check")
def check(path: PathArg) -> None:
    """Validate PATH: exit 0 if the site worker would accept it, 2 with the error if not.

    Catches misspelt keys (with a "did you mean"), keys in the wrong table, wrong types
    and out-of-range values; nothing in a policy is silently defaulted from a typo.
    """
    policy = _load_or_exit(path)
    _out().print(
        f"{path}: valid site policy (digest {policy.digest()})", markup=False, highlight=False
    )
