"""``medfed report``: PNG plots and one HTML page for a run or an experiment directory.

Run directory (``rounds.jsonl``, ``config.json``, ``sites/`` or the run config's
``sites-dir``) -> ``report/``:

* ``metrics.png``: global (server-side held-out) accuracy and AUROC, and each site's
  local validation accuracy, vs round; a dotted line marks the round of ``best_model.pt``
  (federated model selection, server/selection.py);
* ``participation.png``: sites that replied, failed (with injected faults) and dropped
  per round;
* ``epsilon.png``: cumulative epsilon of every site vs round (DP-SGD ledger);
* ``bytes.png``: megabytes sent to and received from the sites per round;
* ``time.png``: round wall time split into training, evaluation and other (s);
* ``explain.png`` (+ ``explain.json``), when the run has ``best_model.pt`` or
  ``final_model.pt`` and a held-out site dataset: Grad-CAM / occlusion overlays of 8
  right and wrong predictions (``simulation.research.model_tools.report_explain``);
* ``report.html``: the best model (which round, by which aggregated site validation
  metric), the plots, the per-round table (with each round's model-selection score),
  failures and drops, the secure-aggregation faults (from ``secagg.jsonl``: which site
  was late, failed, went away or was excluded at which SecAgg+ stage, and whether its
  update is in the round's sum anyway), the config and the per-site data summary
  (counts and label balance from the site manifests).

Experiment directory (``results.json``) -> ``report.html`` with ``ratios.png`` (federated
/ pooled and federated / best-local accuracy), ``accuracy.png`` and the results table,
and a report per federated run. matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common.errors import DataNotFoundError
from server.runlog import DP_NOISE_REPRODUCIBLE
from simulation.research.summary import best_model_line, model_selection, site_validation

REPORT_DIR = "report"
REPORT_HTML = "report.html"
RUN_PLOTS = ("metrics.png", "participation.png", "epsilon.png", "bytes.png", "time.png")
EXPERIMENT_PLOTS = ("ratios.png", "accuracy.png")


def _read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "rounds.jsonl"
    if not path.is_file():
        raise DataNotFoundError(
            f"{run_dir} has no rounds.jsonl: not a medfed run directory (or it never started)"
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_secagg(run_dir: Path) -> list[dict[str, Any]]:
    """Lines of ``secagg.jsonl`` (server/secagg.py), or [] for a run without SecAgg+."""
    path = run_dir / "secagg.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _site_names(rounds: list[dict[str, Any]]) -> dict[str, str]:
    """Flower node ids -> ``site A, B, ...`` in sorted order (node ids are opaque)."""
    nodes: set[str] = set()
    for r in rounds:
        for phase in ("train", "evaluate"):
            p = r.get(phase, {})
            nodes |= {str(n) for n in p.get("sampled", [])}
    return {n: f"site {chr(65 + i) if i < 26 else i}" for i, n in enumerate(sorted(nodes))}


def _new_axes(ncols: int = 1, width: float = 7.0) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, 4.2))
    return fig, list(axes) if ncols > 1 else [axes]


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save_per_round(fig: Any, axes: Sequence[Any], path: Path, *, grid: bool = False) -> None:
    """Save a figure whose x axes are round numbers (integer ticks, optional grid)."""
    for ax in axes:
        if grid:
            ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, path)


def _stacked_bars(
    ax: Any, xs: list[int], layers: Sequence[tuple[Sequence[float], str, str | None]]
) -> None:
    """Bars stacked bottom-up: ``layers`` of ``(heights, label, colour or None)``."""
    bottom: list[float] | None = None
    for heights, label, color in layers:
        ax.bar(xs, heights, bottom=bottom, color=color, label=label)
        bottom = (
            list(heights)
            if bottom is None
            else [a + b for a, b in zip(bottom, heights, strict=True)]
        )


def plot_metrics(rounds: list[dict[str, Any]], path: Path, names: dict[str, str]) -> None:
    """Global accuracy/AUROC and per-site local validation accuracy vs round."""
    fig, (left, right) = _new_axes(2, 6.0)
    xs = [r["round"] for r in rounds]
    for key, label, style in (("accuracy", "accuracy", "o-"), ("auroc", "AUROC", "s--")):
        ys = [_num(r.get("global", {}).get(key)) for r in rounds]
        if any(math.isfinite(y) for y in ys):
            left.plot(xs, ys, style, label=f"global {label} (held-out set)")
    ev = sorted(site_validation(rounds).items())
    mean_site = [(x, _num(p.get("metrics", {}).get("val-accuracy"))) for x, p in ev]
    if mean_site:
        left.plot(
            *zip(*mean_site, strict=True), "^:", label="site val accuracy (example-weighted mean)"
        )
    selection = model_selection(rounds)
    if selection is not None and selection["best-round"] is not None:
        left.axvline(selection["best-round"], color="grey", ls=":", label="best_model.pt round")
    left.set(xlabel="round", ylabel="metric (fraction, 0-1)", title="Global model", ylim=(0, 1))
    if left.lines:
        left.legend(loc="lower right", fontsize=8)
    for node, name in names.items():
        pts = [
            (x, _num(p.get("sites", {}).get(node, {}).get("val-accuracy")))
            for x, p in ev
            if node in p.get("sites", {})
        ]
        if pts:
            right.plot(*zip(*pts, strict=True), "o-", label=name)
    right.set(
        xlabel="round",
        ylabel="local validation accuracy (0-1)",
        title="Each site's validation split",
        ylim=(0, 1),
    )
    if right.lines:
        right.legend(loc="lower right", fontsize=8, ncol=2)
    _save_per_round(fig, (left, right), path, grid=True)


def plot_participation(rounds: list[dict[str, Any]], path: Path) -> None:
    """Stacked bars: sites that replied, failed and dropped in each training round."""
    fig, (ax,) = _new_axes()
    rs = [r for r in rounds if "train" in r]
    xs = [r["round"] for r in rs]
    replied = [len(r["train"].get("replied", [])) for r in rs]
    failed = [len(r["train"].get("failed", {})) for r in rs]
    dropped = [len(r["train"].get("dropped", [])) for r in rs]
    layers = [
        (replied, "replied", "tab:green"),
        (failed, "failed (error reply)", "tab:red"),
        (dropped, "dropped (no reply)", "tab:orange"),
    ]
    _stacked_bars(ax, xs, layers)
    ax.set(xlabel="round", ylabel="sites (count)", title="Site participation in training")
    ax.legend(fontsize=8, loc="lower right")
    ax.yaxis.get_major_locator().set_params(integer=True)
    _save_per_round(fig, [ax], path)


def plot_epsilon(rounds: list[dict[str, Any]], path: Path, names: dict[str, str]) -> None:
    """Cumulative epsilon per site vs round (a note when DP is off)."""
    fig, (ax,) = _new_axes()
    for node, name in names.items():
        pts = [
            (r["round"], _num(r["train"]["sites"][node].get("epsilon")))
            for r in rounds
            if node in r.get("train", {}).get("sites", {})
            and r["train"]["sites"][node].get("epsilon") is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=name)
    ax.set(xlabel="round", ylabel="cumulative ε (delta fixed per site)", title="Privacy spent")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "DP off: no privacy accounting", ha="center", transform=ax.transAxes)
    _save_per_round(fig, [ax], path, grid=True)


def plot_bytes(rounds: list[dict[str, Any]], path: Path) -> None:
    """Megabytes down (to sites) and up (from sites) per round, train + evaluate."""
    fig, (ax,) = _new_axes()
    rs = [r for r in rounds if "train" in r]
    xs = [r["round"] for r in rs]
    mb = 1e6

    def total(r: dict[str, Any], key: str) -> float:
        return sum(_num(r.get(p, {}).get(key, 0)) for p in ("train", "evaluate")) / mb

    width = 0.4
    ax.bar(
        [x - width / 2 for x in xs],
        [total(r, "bytes-down") for r in rs],
        width,
        label="down (server to sites)",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [total(r, "bytes-up") for r in rs],
        width,
        label="up (sites to server)",
    )
    ax.set(xlabel="round", ylabel="model arrays on the wire (MB)", title="Bytes per round")
    ax.legend(fontsize=8)
    _save_per_round(fig, [ax], path)


def plot_time(rounds: list[dict[str, Any]], path: Path) -> None:
    """Stacked bars: round wall time = training phase + evaluation phase + other (s)."""
    fig, (ax,) = _new_axes()
    rs = [r for r in rounds if "train" in r]
    xs = [r["round"] for r in rs]
    train = [_num(r["train"].get("seconds", 0)) for r in rs]
    ev = [_num(r.get("evaluate", {}).get("seconds", 0)) for r in rs]
    other = [
        max(0.0, _num(r.get("wall-seconds", 0)) - t - e)
        for r, t, e in zip(rs, train, ev, strict=True)
    ]
    layers = [
        (train, "training phase (slowest site)", None),
        (ev, "evaluation phase", None),
        (other, "other (aggregation, checkpoint, global eval)", None),
    ]
    _stacked_bars(ax, xs, layers)
    ax.set(xlabel="round", ylabel="seconds", title="Round time breakdown")
    ax.legend(fontsize=8)
    _save_per_round(fig, [ax], path)


# ----------------------------------------------------------------------------- html
CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:4px 0}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:8px}
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def short_reason(reason: str, limit: int = 160) -> str:
    """Return the informative part of a site's error reason (Ray wraps it in a traceback)."""
    for line in reversed(reason.replace("\\n", "\n").splitlines()):
        if "injected fault" in line or "Error" in line or "error" in line:
            start = line.find("injected fault")
            return line[start if start >= 0 else 0 :].strip(" '>")[:limit]
    return reason[:limit]


def secagg_fault(fault: dict[str, Any]) -> str:
    """Say what happened to a site in a secure round (one ``faults`` entry of secagg.jsonl).

    ``late`` (no reply before the stage deadline), ``failed`` (an error reply: a crash
    while training, a refusal), ``dropped`` (the site went away) or ``excluded`` (a
    malformed message); a site gone at ``unmask`` had sent its masked input, so its
    update is in the sum.
    """
    kind, stage = str(fault.get("kind", "?")), str(fault.get("stage", "?"))
    reason = short_reason(str(fault.get("reason", "")))
    if fault.get("in-sum"):
        verb = "gone" if kind == "dropped" else kind
        return f"{verb} at {stage} after sending its masked input (in the sum): {reason}"
    return f"{kind}: {reason}"


def secagg_fault_rows(secagg: list[dict[str, Any]], names: dict[str, str]) -> list[list[Any]]:
    """One row per site that left a secure round, and one per aborted round."""
    rows: list[list[Any]] = []
    for line in secagg:
        rnd = line.get("round", "?")
        if line.get("purpose", "train") != "train":  # the census, the final validation
            rnd = f"{rnd} ({line['purpose']})"
        for fault in line.get("faults", []):
            site = str(fault.get("site"))
            rows.append(
                [
                    rnd,
                    names.get(site, site),
                    fault.get("stage", "?"),
                    secagg_fault(fault),
                    "yes" if fault.get("in-sum") else "no",
                ]
            )
        if line.get("status") == "failed":
            rows.append([rnd, "-", "-", f"round aborted: {line.get('reason', '')}", "-"])
    return rows


def _f(v: Any, digits: int = 4) -> str:
    x = _num(v)
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def _sites_dir(run_dir: Path, config: dict[str, Any]) -> Path | None:
    for cand in (run_dir / "sites", Path(str(config.get("sites-dir", "")))):
        if str(cand) not in ("", ".") and cand.is_dir():
            return cand
    return None


def site_summary(sites_dir: Path | None) -> list[list[Any]]:
    """One row per site dataset: split counts and label balance (from the manifests)."""
    if sites_dir is None:
        return []
    rows = []
    for m in sorted(sites_dir.glob("*/manifest.json")):
        man = json.loads(m.read_text())
        for split, info in man.get("splits", {}).items():
            counts = info.get("label_counts", {})
            total = sum(counts.values()) or 1
            balance = ", ".join(f"{k}: {v} ({100 * v / total:.0f}%)" for k, v in counts.items())
            rows.append([m.parent.name, split, info.get("count", 0), balance])
    return rows


def _write_run_plots(
    rounds: list[dict[str, Any]], run_dir: Path, out: Path, names: dict[str, str]
) -> list[str]:
    """Write a run's plots into ``out``.

    Returns
    -------
    list[str]
        File names of the figures, ``explain.png`` last if the model and data allow it.

    """
    plot_metrics(rounds, out / "metrics.png", names)
    plot_participation(rounds, out / "participation.png")
    plot_epsilon(rounds, out / "epsilon.png", names)
    plot_bytes(rounds, out / "bytes.png")
    plot_time(rounds, out / "time.png")
    from simulation.research.model_tools import report_explain

    return [*RUN_PLOTS, *report_explain(run_dir, out)]  # explain.png if model + data


def _rounds_table(rounds: list[dict[str, Any]], names: dict[str, str]) -> str:
    """Return the HTML table of a run's rounds (metrics, replies, failures, timing).

    Returns
    -------
    str
        The ``<table>`` element.

    """
    validated = site_validation(rounds)
    selection = model_selection(rounds)
    scores = selection["scores"] if selection is not None else {}
    best_round = selection["best-round"] if selection is not None else None
    per_round = [
        [
            f"{r['round']} (best)" if r["round"] == best_round else r["round"],
            _f(r.get("global", {}).get("accuracy")),
            _f(r.get("global", {}).get("auroc")),
            _f(validated.get(r["round"], {}).get("metrics", {}).get("val-accuracy")),
            _f(scores.get(r["round"])),
            _f(r.get("train", {}).get("metrics", {}).get("train-loss")),
            len(r.get("train", {}).get("replied", [])),
            "; ".join(
                f"{names.get(k, k)}: {short_reason(v)}"
                for k, v in r.get("train", {}).get("failed", {}).items()
            )
            or "-",
            ", ".join(names.get(str(n), str(n)) for n in r.get("train", {}).get("dropped", []))
            or "-",
            _f(r.get("wall-seconds"), 1),
            r.get("error", ""),
        ]
        for r in rounds
    ]
    return _table(
        [
            "round",
            "global acc",
            "global AUROC",
            "mean site val acc",
            f"model selection ({selection['metric']})" if selection else "model selection",
            "train loss",
            "replied",
            "failed (reason)",
            "dropped",
            "wall s",
            "error",
        ],
        per_round,
    )


def _secagg_section(run_dir: Path, names: dict[str, str]) -> list[str]:
    """Return the HTML pieces of the secure aggregation faults section.

    Returns
    -------
    list[str]
        Empty if the run has no secure aggregation records.

    """
    secagg = _read_secagg(run_dir)
    secagg_rows = secagg_fault_rows(secagg, names)
    return (
        [
            "<h2>Secure aggregation faults</h2>",
            _table(
                ["round", "site", "SecAgg+ stage", "what happened", "update in sum"], secagg_rows
            )
            if secagg_rows
            else "<p>Every sampled site took part in every secure round.</p>",
        ]
        if secagg
        else []
    )


def write_run_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report/`` (5 PNGs + report.html) for a finished run.

    Returns
    -------
    pathlib.Path
        ``<run_dir>/report/report.html``.

    Raises
    ------
    DataNotFoundError
        If ``run_dir`` has no ``rounds.jsonl``.

    """
    run_dir = Path(run_dir)
    rounds = _read_rounds(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    names = _site_names(rounds)
    figures = _write_run_plots(rounds, run_dir, out, names)
    cfg_path = run_dir / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    best_line = best_model_line(rounds)
    not_private = any(r.get("dp-noise") == DP_NOISE_REPRODUCIBLE for r in rounds)
    secagg_section = _secagg_section(run_dir, names)
    body = [
        f"<h1>medfed run report: {html.escape(run_dir.name)}</h1>",
        *(
            [
                "<p class='warn'><b>NOT PRIVATE:</b> this run used dp.reproducible-noise; "
                "its DP noise and sampling were seeded from the run config, so its epsilon "
                "means nothing against anyone who knows the seed (simulation research "
                "only).</p>"
            ]
            if not_private
            else []
        ),
        f"<p>{len([r for r in rounds if r['round'] > 0])} rounds; model "
        f"{html.escape(str(config.get('model', '?')))}, strategy "
        f"{html.escape(str(config.get('strategy', '?')))}, DP "
        f"{'on' if config.get('dp.enabled') else 'off'}, secure aggregation "
        f"{'on' if config.get('secagg.enabled') else 'off'}.</p>",
        *([f"<p><b>{html.escape(best_line)}</b></p>"] if best_line else []),
        "<div class='grid'>",
        *[f"<img src='{p}' alt='{p}'>" for p in figures],
        "</div>",
        "<h2>Rounds</h2>",
        _rounds_table(rounds, names),
        *secagg_section,
        "<h2>Site datasets</h2>",
        _table(
            ["site", "split", "count", "label balance"],
            site_summary(_sites_dir(run_dir, config)),
        ),
        "<h2>Run config</h2>",
        _table(["key", "value"], [[k, v] for k, v in sorted(config.items())]),
    ]
    page = out / REPORT_HTML
    page.write_text(_page(f"medfed report {run_dir.name}", body))
    return page


def _page(title: str, body: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


# ----------------------------------------------------------------------- experiment
def plot_ratios(summary: list[dict[str, Any]], path: Path) -> None:
    """Plot federated/pooled and federated/best-local per split x setting (bars)."""
    fig, (ax,) = _new_axes(width=max(7.0, 1.2 * len(summary) + 3))
    labels = [f"{r['split']}\n{r['setting']}" for r in summary]
    xs = list(range(len(summary)))
    w = 0.38
    for off, key, label in (
        (-w / 2, "fed/pooled", "federated / pooled"),
        (w / 2, "fed/best-local", "federated / best local"),
    ):
        ax.bar(
            [x + off for x in xs],
            [_num(r[key]) for r in summary],
            w,
            yerr=[_num(r.get(f"{key}-std", 0)) for r in summary],
            capsize=3,
            label=label,
        )
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set(ylabel="accuracy ratio (1 = as good)", title="Does federation help? (mean ± std)")
    ax.set_ylim(0, max(1.2, *(_num(r["fed/best-local"]) + 0.1 for r in summary)))
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_accuracy(summary: list[dict[str, Any]], path: Path) -> None:
    """Plot pooled, best local and federated accuracy per split x setting (bars)."""
    fig, (ax,) = _new_axes(width=max(7.0, 1.2 * len(summary) + 3))
    labels = [f"{r['split']}\n{r['setting']}" for r in summary]
    xs = list(range(len(summary)))
    w = 0.26
    for off, key, label in (
        (-w, "pooled", "pooled"),
        (0.0, "best-local", "best local"),
        (w, "federated", "federated"),
    ):
        ax.bar(
            [x + off for x in xs],
            [_num(r[key]) for r in summary],
            w,
            yerr=[_num(r.get(f"{key}-std", 0)) for r in summary],
            capsize=3,
            label=label,
        )
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set(ylabel="accuracy (0-1)", title="Accuracy on the evaluation sets", ylim=(0, 1))
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _write_run_reports(runs: list[dict[str, Any]], exp_dir: Path) -> list[str]:
    """Write the report of each finished federated run of an experiment.

    Returns
    -------
    list[str]
        One HTML ``<li>`` link per report, relative to ``exp_dir`` where possible.

    """
    links = []
    for r in runs:
        run_dir = Path(r["run-dir"])
        if (run_dir / "rounds.jsonl").is_file():
            page = write_run_report(run_dir)
            rel = page.relative_to(exp_dir) if page.is_relative_to(exp_dir) else page
            links.append(
                f"<li><a href='{html.escape(str(rel))}'>{html.escape(r['split'])} / "
                f"{html.escape(r['setting'])} / seed {r['seed']}</a></li>"
            )
    return links


def _pm(r: dict[str, Any], key: str) -> str:
    """Format ``r[key]`` as ``mean ± std`` (3 digits)."""
    return f"{_f(r[key], 3)} ± {_f(r.get(key + '-std'), 3)}"


def _summary_table(summary: list[dict[str, Any]]) -> str:
    """Return the ``<table>`` of the experiment's results, mean ± std over seeds."""
    return _table(
        [
            "split",
            "setting",
            "DP",
            "seeds",
            "federated",
            "pooled",
            "best local",
            "fed/pooled",
            "fed/best-local",
            "max ε",
        ],
        [
            [
                r["split"],
                r["setting"],
                "on" if r["dp"] else "off",
                r["seeds"],
                _pm(r, "federated"),
                _pm(r, "pooled"),
                _pm(r, "best-local"),
                _pm(r, "fed/pooled"),
                _pm(r, "fed/best-local"),
                _f(r["max-epsilon"], 2) if r["dp"] else "-",
            ]
            for r in summary
        ],
    )


def _per_seed_table(runs: list[dict[str, Any]]) -> str:
    """Return the ``<table>`` of the experiment's results for each seed."""
    return _table(
        [
            "split",
            "setting",
            "seed",
            "federated",
            "pooled",
            "best local (site)",
            "fed/pooled",
            "seconds",
        ],
        [
            [
                r["split"],
                r["setting"],
                r["seed"],
                _f(r["federated"]),
                _f(r["pooled"]),
                f"{_f(r['best-local'])} ({r['best-local-site']})",
                _f(r["fed/pooled"], 3),
                r["seconds"],
            ]
            for r in runs
        ],
    )


def write_experiment_report(exp_dir: Path) -> Path:
    """Write ``<exp_dir>/report.html`` (+ PNGs) and a report for each federated run.

    Returns
    -------
    pathlib.Path
        The experiment's page, which links each run's own report.

    Raises
    ------
    DataNotFoundError
        If ``exp_dir`` has no ``results.json``.

    """
    exp_dir = Path(exp_dir)
    path = exp_dir / "results.json"
    if not path.is_file():
        raise DataNotFoundError(f"{exp_dir} has no results.json: run `medfed experiment` first")
    rows = json.loads(path.read_text())
    summary = [r for r in rows if r.get("kind") == "summary"]
    runs = [r for r in rows if r.get("kind") == "run"]
    plot_ratios(summary, exp_dir / "ratios.png")
    plot_accuracy(summary, exp_dir / "accuracy.png")
    links = _write_run_reports(runs, exp_dir)
    table = _summary_table(summary)
    per_seed = _per_seed_table(runs)
    first_sites = Path(runs[0]["run-dir"]).parent / "sites" if runs else None
    exp_cfg = exp_dir / "experiment.json"
    body = [
        f"<h1>medfed experiment: {html.escape(exp_dir.name)}</h1>",
        "<p>Accuracy of the federated model, the pooled (centralised) model and the best "
        "single-site model, with equal compute and seeds; ratios &lt; 1 mean federation "
        "loses to that reference.</p>",
        "<div class='grid'>",
        *[f"<img src='{p}' alt='{p}'>" for p in EXPERIMENT_PLOTS],
        "</div>",
        "<h2>Results (mean ± std over seeds)</h2>",
        table,
        "<h2>Per seed</h2>",
        per_seed,
        "<h2>Site datasets (first split, first seed)</h2>",
        _table(["site", "split", "count", "label balance"], site_summary(first_sites)),
        "<h2>Federated runs</h2>",
        f"<ul>{''.join(links)}</ul>",
        "<h2>Experiment config</h2>",
        f"<pre>{html.escape(exp_cfg.read_text()) if exp_cfg.is_file() else ''}</pre>",
    ]
    page = exp_dir / REPORT_HTML
    page.write_text(_page(f"medfed experiment {exp_dir.name}", body))
    return page
