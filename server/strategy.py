"""Strategy construction from the run config, and metric aggregation that tolerates NaN."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from common.config import RunConfig
from common.errors import ConfigError, did_you_mean
from common.models import get_model
from common.wire import VAL_COUNT, VAL_PREFIX
from server.scaffold import Scaffold


def aggregate_metrics_nan_aware(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every scalar metric, ignoring sites where it is NaN.

    A site whose validation part holds one class has an undefined AUROC (NaN); Flower's
    ``aggregate_metricrecords`` would turn the whole mean into NaN. Here each key is
    averaged over the sites that define it, weighted by the examples it was measured on:

    * ``val-*`` metrics of a reply that carries ``val-num-examples`` (a train reply whose
      site validated the received global model first, ``evaluate-in-train``) by that
      count of validation images;
    * every other metric (and ``val-*`` of an evaluate reply, whose ``num-examples``
      counts validation images) by ``weight_key``. A train reply with ``val-*`` but no
      ``val-num-examples`` (its policy withheld the count, or an older site) falls back
      to ``weight_key``.

    Parameters
    ----------
    records : list[RecordDict]
        Reply contents, each with one ``MetricRecord`` holding ``weight_key``.
    weight_key : str
        Usually ``"num-examples"``.

    Returns
    -------
    MetricRecord
        Weighted means; NaN where no site defined the metric. The counts (``weight_key``
        and, where reported, ``val-num-examples``) are summed.

    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    counts: dict[str, float] = {weight_key: 0.0}
    for rec in records:
        metrics = next(iter(rec.metric_records.values()))
        w = float(cast(float, metrics[weight_key]))
        w_val = float(cast(float, metrics.get(VAL_COUNT, w)))
        counts[weight_key] += w
        if VAL_COUNT in metrics:
            counts[VAL_COUNT] = counts.get(VAL_COUNT, 0.0) + w_val
        for key, value in metrics.items():
            if key in (weight_key, VAL_COUNT) or isinstance(value, list):
                continue
            kw = w_val if key.startswith(VAL_PREFIX) else w
            v = float(cast(float, value))
            sums.setdefault(key, 0.0)
            weights.setdefault(key, 0.0)
            if math.isfinite(v):
                sums[key] += kw * v
                weights[key] += kw
    out = MetricRecord({k: (sums[k] / weights[k] if weights[k] else math.nan) for k in sums})
    for key, total in counts.items():
        out[key] = total
    return out


def _common(run: RunConfig) -> dict[str, Any]:
    """Return the sampling and metric arguments every FedAvg-family strategy takes."""
    fed = run.federation
    return {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": max(1, math.ceil(fed.fraction_train * fed.min_sites)),
        "min_evaluate_nodes": max(1, math.ceil(fed.fraction_evaluate * fed.min_sites))
        if fed.fraction_evaluate > 0
        else 0,
        "min_available_nodes": fed.min_sites,
        "train_metrics_aggr_fn": aggregate_metrics_nan_aware,
        "evaluate_metrics_aggr_fn": aggregate_metrics_nan_aware,
    }


def _fedavg(run: RunConfig) -> Strategy:
    return FedAvg(**_common(run))


def _fedprox(run: RunConfig) -> Strategy:
    # FedProx sends ``proximal-mu`` in every train message's config; the site adds
    # mu/2 ||w - w_global||^2 to its loss (client/proximal.py ProximalLoss; Li et al. 2020).
    return FedProx(**_common(run), proximal_mu=run.strategy.proximal_mu)


class _KeepDtypes:
    """Mixin: cast the aggregated arrays back to the dtypes the sites sent.

    Flower 1.41's FedAdam/FedYogi multiply the float32 update by a NumPy float64 scalar
    (the bias-corrected server learning rate), which under NumPy 2 promotion rules makes
    the new global model float64; the sites' ``load_record`` then (rightly) refuses it.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        ok = next((r for r in replies if not r.has_error()), None)
        if arrays is None or ok is None:
            return arrays, metrics
        sent = next(iter(ok.content.array_records.values()))
        return (
            ArrayRecord(
                {
                    k: Array(np.asarray(a.numpy(), dtype=sent[k].numpy().dtype))
                    for k, a in arrays.items()
                }
            ),
            metrics,
        )


class _FedAdam(_KeepDtypes, FedAdam):
    """FedAdam whose global model keeps the model's dtypes."""


class _FedYogi(_KeepDtypes, FedYogi):
    """FedYogi whose global model keeps the model's dtypes."""


def _fedadam(run: RunConfig) -> Strategy:
    # Reddi et al. 2021 (Adaptive Federated Optimization); eta_l only feeds Flower's log.
    return _FedAdam(**_common(run), eta=run.strategy.server_lr, eta_l=run.train.learning_rate)


def _fedyogi(run: RunConfig) -> Strategy:
    return _FedYogi(**_common(run), eta=run.strategy.server_lr, eta_l=run.train.learning_rate)


def _fedmedian(run: RunConfig) -> Strategy:
    return FedMedian(**_common(run))


def _fedtrimmedavg(run: RunConfig) -> Strategy:
    return FedTrimmedAvg(**_common(run), beta=run.strategy.trim_beta)


def _krum(run: RunConfig) -> Strategy:
    return Krum(**_common(run), num_malicious_nodes=run.strategy.krum_byzantine)


def _scaffold(run: RunConfig) -> Strategy:
    # Karimireddy et al. 2020; server/scaffold.py keeps the server control variate and
    # the sites keep theirs in their state-dir (client/scaffold.py).
    model = get_model(run.model, **run.model_kwargs())
    return Scaffold(parameter_names=[n for n, _ in model.named_parameters()], **_common(run))


_FACTORIES: dict[str, Callable[[RunConfig], Strategy]] = {
    "scaffold": _scaffold,
    "fedavg": _fedavg,
    "fedprox": _fedprox,
    "fedadam": _fedadam,
    "fedyogi": _fedyogi,
    "fedmedian": _fedmedian,
    "fedtrimmedavg": _fedtrimmedavg,
    "krum": _krum,
}


def build_strategy(run: RunConfig) -> Strategy:
    """Build the Flower Message-API strategy named by run config ``strategy``.

    Raises
    ------
    ConfigError
        For an unknown strategy name (with a "did you mean").

    """
    try:
        factory = _FACTORIES[run.strategy.name]
    except KeyError:
        raise ConfigError(
            f"unknown strategy {run.strategy.name!r}.{did_you_mean(run.strategy.name, _FACTORIES)}"
        ) from None
    return factory(run)
