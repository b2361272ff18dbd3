"""Read a run directory's round log and render the end-of-run summary table."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.runlog import DP_NOISE_REPRODUCIBLE
from server.selection import BEST_MODEL

ROUNDS_FILE = "rounds.jsonl"
ROUND_RE = re.compile(r"\[ROUND (\d+)/(\d+)\]")


@contextlib.contextmanager
def round_progress(
    console: Console, rounds: int, *, echo_all: bool = False
) -> Iterator[Callable[[str], None]]:
    """Show a per-round progress bar driven by the lines ``flwr run --stream`` prints.

    Yields the ``on_line`` callback to hand to the runner: it advances the bar on every
    ``[ROUND r/R]`` line of Flower's strategy log and echoes errors (or every line with
    ``echo_all``). The bar is completed when the block exits normally.
    """
    with Progress(
        TextColumn("[bold blue]federated rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("rounds", total=rounds)

        def on_line(line: str) -> None:
            if m := ROUND_RE.search(line):
                progress.update(task, completed=int(m.group(1)) - 1)
            if echo_all or "ERROR" in line or "Traceback" in line:
                progress.console.print(line, markup=False, highlight=False)

        yield on_line
        progress.update(task, completed=rounds)


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """Parse ``rounds.jsonl`` (one JSON object per line, round 0 = initial model)."""
    path = run_dir / ROUNDS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def site_validation(rounds: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Return the sites' local validation of the global model after each round.

    ``{round: {"metrics": aggregated val-*, "sites": {node: val-*}}}`` from round r's
    evaluate phase or, with ``evaluate-in-train``, from the ``val-*`` metrics of round
    r+1's train replies, which evaluated the global model of round r (round 0: the
    initial model).
    """
    out: dict[int, dict[str, Any]] = {}
    for r in rounds:
        tr = r.get("train", {})
        folded = {k: v for k, v in tr.get("metrics", {}).items() if k.startswith("val-")}
        if folded and r["round"] > 0:
            sites = {
                node: {k: v for k, v in m.items() if k.startswith("val-")}
                for node, m in tr.get("sites", {}).items()
            }
            out[r["round"] - 1] = {"metrics": folded, "sites": sites}
    for r in rounds:
        ev = r.get("evaluate", {})
        if ev.get("metrics"):
            out[r["round"]] = {"metrics": ev["metrics"], "sites": ev.get("sites", {})}
    return out


def model_selection(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the run's federated model selection from the round lines.

    Returns
    -------
    dict or None
        ``{"metric", "best-round", "best-value", "scores": {round: value}}``: the
        ``model-selection-metric``, the round whose global model ``best_model.pt`` holds
        (None if no round had a score) and its value, and the aggregated site validation
        value of every global model the sites validated (server/selection.py). None for
        a run logged without model selection.

    """
    entries = [r["model-selection"] for r in rounds if "model-selection" in r]
    if not entries:
        return None
    scores: dict[int, Any] = {}
    for entry in entries:
        for rnd, value in entry.get("validated", {}).items():
            scores.setdefault(int(rnd), value)
    return {
        "metric": entries[-1]["metric"],
        "best-round": entries[-1].get("best-round"),
        "best-value": entries[-1].get("best-value"),
        "scores": scores,
    }


def best_model_line(rounds: list[dict[str, Any]]) -> str | None:
    """``best model: round k (val-balanced-accuracy 0.9300) -> best_model.pt``, or None.

    None for a run without model selection; a sentence saying why when no round had a
    score (then the run has no ``best_model.pt``).
    """
    selection = model_selection(rounds)
    if selection is None:
        return None
    if selection["best-round"] is None:
        return (
            f"no best model: no round's global model has an aggregated {selection['metric']} "
            "(no site validated it)"
        )
    line = (
        f"best model: round {selection['best-round']} ({selection['metric']} "
        f"{_fmt(selection['best-value'])}) -> {BEST_MODEL}"
    )
    point = _operating_point(rounds, selection["best-round"])
    if point is not None:
        line += (
            f"; operating point ({point.get('method')}, pooled site validation): threshold "
            f"{_fmt(point.get('threshold'))}, sensitivity {_fmt(point.get('sensitivity'))}, "
            f"specificity {_fmt(point.get('specificity'))}"
        )
    return line


def _operating_point(rounds: list[dict[str, Any]], best_round: Any) -> dict[str, Any] | None:
    """Return the operating point the round log recorded for round ``best_round``'s model."""
    for r in rounds:
        points = (r.get("model-selection") or {}).get("operating-point") or {}
        point = points.get(str(best_round))
        if isinstance(point, dict):
            return point
    return None


def summary_table(rounds: list[dict[str, Any]]) -> Table:
    """Per-round global validation accuracy and AUROC, local metrics, drops and timing."""
    table = Table(
        title="medfed: per-round results",
        caption="val = global model on the held-out validation split; site acc = mean "
        "local validation accuracy at the sites (of the round's global model; with "
        "evaluate-in-train measured in the next train message); max ε = largest "
        "cumulative epsilon of any site; lost = sites dropped or failed",
    )
    for col, justify in (
        ("round", "right"),
        ("val acc", "right"),
        ("val AUROC", "right"),
        ("site acc", "right"),
        ("loss", "right"),
        ("max ε", "right"),
        ("sites", "right"),
        ("lost", "right"),
        ("wall s", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    # Segmentation runs (common/tasks.py) report Dice: global and mean local.
    dice = any("dice" in r.get("global", {}) for r in rounds)
    if dice:
        table.add_column("val Dice", justify="right")
        table.add_column("site Dice", justify="right")
    selection = model_selection(rounds)
    if selection is not None:
        # Federated model selection (server/selection.py): the round's global model scored
        # by the sites' aggregated validation, and the round best_model.pt holds.
        table.add_column(f"site {selection['metric'].removeprefix('val-')}", justify="right")
        table.add_column("best", justify="center")
        table.caption = (
            f"{table.caption}; site {selection['metric'].removeprefix('val-')} = the "
            "round's global model on the sites' validation splits (aggregated, weighted "
            f"by their sizes; picks the best model); ★ = {BEST_MODEL}"
        )
    if any(r.get("dp-noise") == DP_NOISE_REPRODUCIBLE for r in rounds):
        table.title = (
            "medfed: per-round results: NOT PRIVATE (dp.reproducible-noise: DP noise "
            "seeded from the run config)"
        )
    validated = site_validation(rounds)
    for r in rounds:
        g = r.get("global", {})
        tr = r.get("train", {})
        ev = validated.get(r["round"], {})
        lost = len(tr.get("dropped", [])) + len(tr.get("failed", {}))
        extra = [_fmt(g.get("dice")), _fmt(ev.get("metrics", {}).get("val-dice"))] if dice else []
        if selection is not None:
            best = r["round"] == selection["best-round"]
            extra += [_fmt(selection["scores"].get(r["round"])), "★" if best else ""]
        table.add_row(
            str(r["round"]),
            _fmt(g.get("accuracy")),
            _fmt(g.get("auroc")),
            _fmt(ev.get("metrics", {}).get("val-accuracy")),
            _fmt(tr.get("metrics", {}).get("train-loss")),
            _fmt(_max_epsilon(tr), 2),
            str(len(tr.get("replied", []))) if tr else "-",
            str(lost) if tr else "-",
            _fmt(r.get("wall-seconds"), 1),
            *extra,
        )
    return table


def _max_epsilon(phase: dict[str, Any]) -> float | None:
    eps = [s["epsilon"] for s in phase.get("sites", {}).values() if s.get("epsilon") is not None]
    return max(eps) if eps else None


def site_table(rounds: list[dict[str, Any]]) -> Table:
    """Per site (Flower node ID): examples, rounds trained, last loss, cumulative epsilon.

    Epsilon is the site's own cumulative figure from its privacy ledger (reported in its
    last reply); refusals and failures are listed with the reason the site gave.
    """
    table = Table(title="medfed: per-site summary")
    for col in (
        "site (node id)",
        "examples",
        "rounds",
        "last loss",
        "epsilon",
        "delta",
        "last failure",
    ):
        table.add_column(
            col, justify="left" if col in ("site (node id)", "last failure") else "right"
        )
    sites: dict[str, dict[str, Any]] = {}
    for r in rounds:
        tr = r.get("train", {})
        for node, m in tr.get("sites", {}).items():
            s = sites.setdefault(node, {"rounds": 0})
            s.update(m)
            s["rounds"] += 1
        for node, reason in tr.get("failed", {}).items():
            sites.setdefault(node, {"rounds": 0})["failure"] = f"round {r['round']}: {reason}"
        for node in tr.get("dropped", []):
            sites.setdefault(str(node), {"rounds": 0})["failure"] = f"round {r['round']}: dropped"
    for node, s in sorted(sites.items()):
        table.add_row(
            node,
            str(int(s["num-examples"])) if "num-examples" in s else "-",
            str(s["rounds"]),
            _fmt(s.get("train-loss")),
            _fmt(s.get("epsilon"), 3),
            "-" if s.get("delta") is None else f"{s['delta']:.1e}",
            str(s.get("failure", ""))[:80],
        )
    return table
