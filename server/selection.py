"""Federated model selection: which round's global model validated best at the sites.

The coordinator holds no data, so a global model is scored by the sites' own validation
of it: each site evaluates the model on its ``val`` split and replies with ``val-*``
metrics, which the strategy averages weighted by the sites' validation sizes
(``aggregate_metrics_nan_aware`` in server/strategy.py). Which model those metrics
describe depends on the phase that carried them:

* **train phase of round r** (``evaluate-in-train``): each site validated the global
  model it *received*, before training on it: the model of round ``r - 1`` (round 0 is
  the initial model);
* **evaluate phase of round r** (every round without ``evaluate-in-train``, else the
  final round only): the model aggregated in round ``r``.

:func:`attribute` maps one round's aggregated metrics to the rounds whose models they
describe; :func:`select_best` picks the best round by ``model-selection-metric``
(:func:`resolve_metric`): a metric ending in ``loss`` is minimised, any other maximised;
NaN (no site defined it) and rounds without validation (a site policy refused the
evaluation) are skipped; ties go to the later round; round 0, the untrained initial
model, is chosen only when no trained round has a valid score.
:class:`server.runlog.RecordingStrategy` applies them every round and writes
:data:`BEST_MODEL`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config import AUTO_SELECTION, RunConfig
from common.wire import VAL_COUNT, VAL_PREFIX

#: File in the run directory: the global model of the selected round.
BEST_MODEL = "best_model.pt"
#: ``model-selection-metric`` of classification tasks under ``auto``.
CLASSIFICATION_METRIC = VAL_PREFIX + "balanced-accuracy"


def resolve_metric(run: RunConfig) -> str:
    """Return the run's ``model-selection-metric``, with ``auto`` resolved by task.

    ``auto``: :data:`CLASSIFICATION_METRIC` for classification tasks (including
    tabular), ``val-`` + the first headline metric of any other task
    (``common.tasks.Task.headline``: ``val-dice`` for segmentation).
    """
    if run.evaluation.selection_metric != AUTO_SELECTION:
        return run.evaluation.selection_metric
    from common.tasks import ClassificationTask, get_task

    task = get_task(run.task)
    if isinstance(task, ClassificationTask):
        return CLASSIFICATION_METRIC
    return VAL_PREFIX + task.headline[0]


def is_minimised(metric: str) -> bool:
    """Whether lower is better for ``metric``: losses are minimised, the rest maximised."""
    return metric.endswith("loss")


def validation_part(aggregated: Mapping[str, Any], *, count_key: str) -> dict[str, float]:
    """Return the ``val-*`` metrics of one phase's aggregate, or ``{}`` if it has none.

    Parameters
    ----------
    aggregated : Mapping
        The phase's aggregated metrics.
    count_key : str
        Where the phase counts validation images: ``val-num-examples`` in the train phase,
        ``num-examples`` in the evaluate phase. Copied as ``val-num-examples`` when present.

    """
    out = {
        k: float(v)
        for k, v in aggregated.items()
        if k.startswith(VAL_PREFIX) and k != VAL_COUNT and isinstance(v, int | float)
    }
    count = aggregated.get(count_key)
    if out and isinstance(count, int | float):
        out[VAL_COUNT] = float(count)
    return out


def attribute(
    server_round: int, *, train: Mapping[str, Any], evaluate: Mapping[str, Any]
) -> dict[int, dict[str, float]]:
    """Map round ``server_round``'s aggregated validation to the models it describes.

    Parameters
    ----------
    server_round : int
        The round that just closed (>= 1; round 0 has no replies).
    train, evaluate : Mapping
        The round's aggregated train and evaluate metrics (``{}`` for a phase that did
        not run).

    Returns
    -------
    dict[int, dict[str, float]]
        ``{round: val metrics}``: the train phase's ``val-*`` under ``server_round - 1``,
        the evaluate phase's under ``server_round``; a phase without ``val-*`` adds
        nothing.

    """
    out: dict[int, dict[str, float]] = {}
    if server_round >= 1 and (folded := validation_part(train, count_key=VAL_COUNT)):
        out[server_round - 1] = folded
    if evaluated := validation_part(evaluate, count_key="num-examples"):
        out[server_round] = evaluated
    return out


@dataclass(frozen=True)
class Selection:
    """The best-scoring global model so far.

    Attributes
    ----------
    round : int
        The round whose global model it is (0: the initial model).
    metric : str
        The ``model-selection-metric`` it was chosen by.
    value : float
        Its aggregated value of ``metric``.
    metrics : dict[str, float]
        All its aggregated ``val-*`` metrics (and ``val-num-examples``).

    """

    round: int
    metric: str
    value: float
    metrics: dict[str, float]


def select_best(scores: Mapping[int, Mapping[str, float]], *, metric: str) -> Selection | None:
    """Pick the round whose global model scored best on ``metric``.

    Parameters
    ----------
    scores : Mapping[int, Mapping[str, float]]
        ``{round: aggregated val metrics}`` (from :func:`attribute`).
    metric : str
        The ``model-selection-metric``, e.g. ``val-balanced-accuracy``.

    Returns
    -------
    Selection or None
        The best round among those with a finite ``metric``: lowest value if
        :func:`is_minimised`, else highest; a tie goes to the later round; round 0 only
        if no later round has a finite value. None when no round has one.

    """
    valid = {
        r: m
        for r, m in scores.items()
        if isinstance(m.get(metric), int | float) and math.isfinite(m[metric])
    }
    trained = {r: m for r, m in valid.items() if r > 0}
    candidates = trained or valid
    if not candidates:
        return None
    sign = -1.0 if is_minimised(metric) else 1.0
    best = max(candidates, key=lambda r: (sign * candidates[r][metric], r))
    return Selection(
        round=best, metric=metric, value=float(candidates[best][metric]), metrics=dict(scores[best])
    )
