"""Read a run directory's round log and render the end-of-run summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

ROUNDS_FILE = "rounds.jsonl"


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """Parse ``rounds.jsonl`` (one JSON object per line, round 0 = initial model)."""
    path = run_dir / ROUNDS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def summary_table(rounds: list[dict[str, Any]]) -> Table:
    """Per-round global validation accuracy and AUROC, local metrics, drops and timing."""
    table = Table(
        title="medfed: per-round results",
        caption="val = global model on the held-out validation split; site acc = mean "
        "local validation accuracy at the sites; lost = sites dropped or failed",
    )
    for col, justify in (
        ("round", "right"),
        ("val acc", "right"),
        ("val AUROC", "right"),
        ("site acc", "right"),
        ("loss", "right"),
        ("sites", "right"),
        ("lost", "right"),
        ("wall s", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rounds:
        g = r.get("global", {})
        tr, ev = r.get("train", {}), r.get("evaluate", {})
        lost = len(tr.get("dropped", [])) + len(tr.get("failed", {}))
        table.add_row(
            str(r["round"]),
            _fmt(g.get("accuracy")),
            _fmt(g.get("auroc")),
            _fmt(ev.get("metrics", {}).get("val-accuracy")),
            _fmt(tr.get("metrics", {}).get("train-loss")),
            str(len(tr.get("replied", []))) if tr else "-",
            str(lost) if tr else "-",
            _fmt(r.get("wall-seconds"), 1),
        )
    return table
