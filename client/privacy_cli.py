"""``medfed budget``: what a site has spent, and what joining a study would cost."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from client.privacy import PrivacyError, PrivacyLedger, epsilon_of, ledger_key, plan_round
from common.config import ACCOUNTANTS

console = Console()
err = Console(stderr=True)

budget_app = typer.Typer(
    help="Privacy budget of this site: spent per dataset (show), planned (forecast), and an "
    "explicit, audited reset.",
    no_args_is_help=True,
)


@budget_app.command()
def show(
    state_dir: Annotated[Path, typer.Argument(help="The site's state-dir (node config).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the cumulative epsilon spent on each dataset of this site, over all projects.

    Reads and verifies the site's privacy ledger (HMAC-SHA256, and its anchor in the
    site's audit log); a tampered, corrupt, rolled-back, replaced or deleted ledger is
    reported, never reset.
    """
    try:
        entries = PrivacyLedger(state_dir).read()
    except PrivacyError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from None
    rows = []
    for key, e in sorted(entries.items()):
        history = [tuple(h) for h in e.get("history", [])]
        rows.append(
            {
                "dataset": key,
                "accountant": e.get("accountant", "rdp"),
                "delta": e.get("delta"),
                "steps": int(sum(h[2] for h in history)),
                "runs": len(e.get("plans", {})),
                "epsilon": epsilon_of(
                    history,
                    delta=float(e.get("delta", 1e-5)),
                    accountant=e.get("accountant", "rdp"),
                ),
                "updated": e.get("updated", ""),
            }
        )
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        console.print(f"no privacy spent yet (no ledger in {state_dir})")
        return
    table = Table(title=f"privacy ledger: {state_dir}")
    for col in ("dataset", "accountant", "delta", "steps", "runs", "epsilon", "updated"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["dataset"][:16],
            r["accountant"],
            f"{r['delta']:.2e}",
            str(r["steps"]),
            str(r["runs"]),
            f"{r['epsilon']:.3f}",
            r["updated"],
        )
    console.print(table)


@budget_app.command()
def forecast(
    examples: Annotated[int, typer.Option(help="Training examples (patients) at the site.")],
    rounds: Annotated[int, typer.Option(help="Federated rounds planned.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Logical batch size.")] = 32,
    epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    noise_multiplier: Annotated[
        float, typer.Option(help="Noise multiplier sigma; omit to solve for --target-epsilon.")
    ] = 0.0,
    target_epsilon: Annotated[
        float, typer.Option(help="Solve for the sigma that reaches this epsilon.")
    ] = 8.0,
    delta: Annotated[float, typer.Option(help="Delta; default 0.1 / examples.")] = 0.0,
    accountant: Annotated[str, typer.Option(help="rdp or prv.")] = "rdp",
) -> None:
    """Forecast epsilon per round for a planned study, before the site joins it.

    Give --noise-multiplier to see the epsilon after each round, or leave it out to get
    the noise multiplier that reaches --target-epsilon after all rounds.

    Example: medfed budget forecast --examples 3000 --rounds 10 --batch-size 32
    """
    if examples < 1 or rounds < 1 or batch_size < 1 or epochs < 1:
        err.print("[bold red]error:[/] examples, rounds, batch size and epochs must be >= 1")
        raise typer.Exit(code=2)
    if accountant not in ACCOUNTANTS:
        err.print(f"[bold red]error:[/] --accountant must be one of {list(ACCOUNTANTS)}")
        raise typer.Exit(code=2)
    d = delta or 0.1 / examples
    plan = plan_round(
        num_examples=examples,
        batch_size=batch_size,
        local_epochs=epochs,
        num_rounds=rounds,
        max_grad_norm=1.0,
        delta=d,
        accountant=accountant,
        noise_multiplier=noise_multiplier or None,
        target_epsilon=target_epsilon,
    )
    table = Table(
        title=f"epsilon forecast: N={examples}, batch {batch_size}, {epochs} epoch(s)/round, "
        f"sigma {plan.noise_multiplier:.4f}, delta {d:.2e} ({accountant})"
    )
    table.add_column("round", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("epsilon", justify="right")
    for r in range(1, rounds + 1):
        eps = epsilon_of(
            [(plan.noise_multiplier, plan.sample_rate, plan.steps * r)],
            delta=d,
            accountant=accountant,
        )
        table.add_row(str(r), str(plan.steps * r), f"{eps:.3f}")
    console.print(table)
    if not noise_multiplier:
        console.print(
            f"noise multiplier for epsilon {target_epsilon:g} after {rounds} rounds: "
            f"[bold]{plan.noise_multiplier:.4f}[/]"
        )


@budget_app.command()
def reset(
    state_dir: Annotated[Path, typer.Argument(help="The site's state-dir (node config).")],
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            help="Full fingerprint of the dataset to reset (`medfed budget show --json`).",
        ),
    ],
    yes: Annotated[
        bool,
        typer.Option("--yes-i-understand", help="Confirm: this dataset's budget restarts at 0."),
    ] = False,
) -> None:
    """Restart one dataset's privacy budget at zero, recorded in the site's audit log.

    For a site that refuses to train because its ledger was rolled back, replaced or
    deleted, when restoring the ledger and audit log that belong together is not
    possible. Epsilon already spent on that dataset is then no longer counted: the
    site's ceiling no longer bounds the total. Other datasets keep what the ledger file
    holds (if its integrity check passes). The audit log records a `ledger-reset`
    entry with the steps dropped.

    Example: medfed budget reset /var/lib/medfed --dataset 3f2a... --yes-i-understand
    """
    if not yes:
        err.print(
            "[bold red]error:[/] resetting restarts this dataset's privacy budget at zero; "
            "pass --yes-i-understand to confirm"
        )
        raise typer.Exit(code=2)
    if not state_dir.is_dir():
        err.print(f"[bold red]error:[/] no state dir at {state_dir}")
        raise typer.Exit(code=2)
    try:
        steps = PrivacyLedger(state_dir).reset(ledger_key(dataset))
    except PrivacyError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from None
    console.print(
        f"privacy budget of dataset {dataset[:16]} reset ({steps} recorded steps dropped); "
        "recorded in the site's audit log"
    )


def register(app: typer.Typer) -> None:
    """Add ``medfed budget`` to the root app."""
    app.add_typer(budget_app, name="budget")
