"""``medfed budget``: what a site has spent, and what joining a study would cost."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from client.privacy import PrivacyError, PrivacyLedger, epsilon_of, ledger_key, plan_round
from common.cli import fail
from common.config import ACCOUNTANTS

console = Console()

#: Limits of ``medfed budget forecast`` (documented in its help): a plan outside them is
#: refused before any accounting, which for a billion rounds would never finish.
MAX_FORECAST_ROUNDS = 100_000
MAX_FORECAST_EXAMPLES = 10**9
MAX_FORECAST_EPOCHS = 1_000
#: Rows of the forecast table: longer plans show this many rounds, evenly spaced,
#: always including the first and the last (each row is one accountant evaluation).
FORECAST_ROWS = 20

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
        raise fail(exc) from None
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


def forecast_problem(
    *,
    examples: int,
    rounds: int,
    batch_size: int,
    epochs: int,
    noise_multiplier: float,
    target_epsilon: float,
    delta: float,
    accountant: str,
) -> str | None:
    """Return what is wrong with a ``medfed budget forecast`` request, or ``None``.

    Parameters
    ----------
    examples, rounds, batch_size, epochs : int
        The planned study (see :func:`forecast`).
    noise_multiplier, target_epsilon, delta : float
        Sigma (0 = solve for ``target_epsilon``), the target and delta (0 = default).
    accountant : str
        ``rdp`` or ``prv``.

    Returns
    -------
    str or None
        A message naming the option, its range and the value given.

    """
    counts = (
        ("--examples", examples, MAX_FORECAST_EXAMPLES),
        ("--rounds", rounds, MAX_FORECAST_ROUNDS),
        ("--batch-size", batch_size, MAX_FORECAST_EXAMPLES),
        ("--epochs", epochs, MAX_FORECAST_EPOCHS),
    )
    for option, value, most in counts:
        if not 1 <= value <= most:
            return f"{option} must be between 1 and {most}, got {value}"
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        return f"--target-epsilon must be a finite number > 0, got {target_epsilon}"
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        return (
            f"--noise-multiplier must be a finite number >= 0 (0: solve for "
            f"--target-epsilon), got {noise_multiplier}"
        )
    if not math.isfinite(delta) or not 0 <= delta < 1:
        return f"--delta must be in [0, 1) (0: 0.1 / examples), got {delta}"
    if accountant not in ACCOUNTANTS:
        return f"--accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}"
    return None


def forecast_rows(rounds: int, most: int = FORECAST_ROWS) -> list[int]:
    """Return the rounds the table shows: all, or ``most`` evenly spaced incl. first and last."""
    if rounds <= most:
        return list(range(1, rounds + 1))
    return sorted({1 + round(i * (rounds - 1) / (most - 1)) for i in range(most)})


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

    Limits: --examples 1..1e9 (and --batch-size at most that), --rounds 1..100000,
    --epochs 1..1000; --target-epsilon finite and > 0; --noise-multiplier finite and >= 0
    (0 = solve); --delta in [0, 1) (0 = 0.1 / examples). Plans of more than 20 rounds
    show 20 rounds, evenly spaced, including the last.

    Example: medfed budget forecast --examples 3000 --rounds 10 --batch-size 32
    """
    problem = forecast_problem(
        examples=examples,
        rounds=rounds,
        batch_size=batch_size,
        epochs=epochs,
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
    )
    if problem is not None:
        raise fail(problem)
    d = delta or 0.1 / examples
    try:
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
    except (ValueError, ArithmeticError) as exc:  # Opacus: e.g. an unreachable target
        raise fail(
            f"no noise multiplier reaches epsilon {target_epsilon:g} after {rounds} rounds "
            f"at delta {d:.2e} ({exc}); raise --target-epsilon or plan fewer rounds or epochs"
        ) from None
    shown = forecast_rows(rounds)
    table = Table(
        title=f"epsilon forecast: N={examples}, batch {batch_size}, {epochs} epoch(s)/round, "
        f"sigma {plan.noise_multiplier:.4f}, delta {d:.2e} ({accountant})",
        caption=None
        if len(shown) == rounds
        else f"{len(shown)} of {rounds} rounds shown, evenly spaced",
    )
    table.add_column("round", justify="right")
    table.add_column("steps", justify="right")
    table.add_column("epsilon", justify="right")
    for r in shown:
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
        raise fail(
            "resetting restarts this dataset's privacy budget at zero; "
            "pass --yes-i-understand to confirm"
        )
    if not state_dir.is_dir():
        raise fail(f"no state dir at {state_dir}")
    try:
        steps = PrivacyLedger(state_dir).reset(ledger_key(dataset))
    except PrivacyError as exc:
        raise fail(exc) from None
    console.print(
        f"privacy budget of dataset {dataset[:16]} reset ({steps} recorded steps dropped); "
        "recorded in the site's audit log"
    )


def register(app: typer.Typer) -> None:
    """Add ``medfed budget`` to the root app."""
    app.add_typer(budget_app, name="budget")
