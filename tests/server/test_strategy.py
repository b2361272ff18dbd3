import math

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from common.config import STRATEGIES, RunConfig
from server.strategy import aggregate_metrics_nan_aware, build_strategy


def _reply(n, **metrics):
    return RecordDict({"metrics": MetricRecord({"num-examples": n, **metrics})})


def test_nan_sites_are_left_out_of_that_metric_only():
    # site A (30 examples) auroc 0.9, site B (10) auroc NaN; accuracy defined at both
    out = aggregate_metrics_nan_aware(
        [_reply(30, auroc=0.9, acc=0.5), _reply(10, auroc=math.nan, acc=1.0)], "num-examples"
    )
    assert out["auroc"] == pytest.approx(0.9)
    assert out["acc"] == pytest.approx((30 * 0.5 + 10 * 1.0) / 40)
    assert out["num-examples"] == 40


def test_every_configured_strategy_builds():
    for name in STRATEGIES:
        # robust strategies need plaintext updates, FedProx needs DP off, SCAFFOLD also
        # plain SGD (common/config.py)
        run = RunConfig(strategy=name, secagg_enabled=False, dp_enabled=False, momentum=0.0)
        assert build_strategy(run) is not None
    assert isinstance(build_strategy(RunConfig()), FedAvg)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dp_enabled": True, "secagg_enabled": False, "momentum": 0.0}, "dp.enabled"),
        ({"dp_enabled": False, "secagg_enabled": True, "momentum": 0.0}, "secagg.enabled"),
        ({"dp_enabled": False, "secagg_enabled": False, "momentum": 0.9}, "momentum"),
    ],
)
def test_scaffold_refuses_settings_it_cannot_honour(changes, match):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        RunConfig(strategy="scaffold", **changes)
