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
        run = RunConfig.from_run_config(
            {"strategy": name, "secagg.enabled": False, "dp.enabled": False, "momentum": 0.0}
        )
        assert build_strategy(run) is not None
    assert isinstance(build_strategy(RunConfig()), FedAvg)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dp.enabled": True, "secagg.enabled": False, "momentum": 0.0}, "dp.enabled"),
        ({"dp.enabled": False, "secagg.enabled": True, "momentum": 0.0}, "secagg.enabled"),
        ({"dp.enabled": False, "secagg.enabled": False, "momentum": 0.9}, "momentum"),
    ],
)
def test_scaffold_refuses_settings_it_cannot_honour(changes, match):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        RunConfig.from_run_config({"strategy": "scaffold", **changes})


def test_validation_metrics_are_weighted_by_the_sites_validation_sizes():
    # Prepare: evaluate-in-train replies of two sites with equal training sets but
    # different validation splits (10 and 30 images)
    a = _reply(100, **{"train-loss": 1.0, "val-accuracy": 0.9, "val-num-examples": 10})
    b = _reply(100, **{"train-loss": 3.0, "val-accuracy": 0.5, "val-num-examples": 30})
    # Execute
    out = aggregate_metrics_nan_aware([a, b], "num-examples")
    # Assert: val-* by validation size, the rest by training size; both counts summed
    assert out["val-accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40)
    assert out["train-loss"] == pytest.approx(2.0)
    assert out["val-num-examples"] == 40
    assert out["num-examples"] == 200


def test_evaluate_replies_weight_validation_by_their_num_examples():
    # an evaluate reply's num-examples is its count of validation images
    out = aggregate_metrics_nan_aware(
        [_reply(10, **{"val-accuracy": 0.9}), _reply(30, **{"val-accuracy": 0.5})], "num-examples"
    )
    assert out["val-accuracy"] == pytest.approx(0.6)
    assert "val-num-examples" not in out


def test_a_site_that_withholds_its_validation_count_falls_back_to_num_examples():
    # Prepare: site B's policy does not allow val-num-examples
    a = _reply(100, **{"val-accuracy": 0.9, "val-num-examples": 10, "val-auroc": math.nan})
    b = _reply(30, **{"val-accuracy": 0.5})
    # Execute
    out = aggregate_metrics_nan_aware([a, b], "num-examples")
    # Assert: A by its 10 validation images, B by its 30 training images
    assert out["val-accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40)
    assert math.isnan(out["val-auroc"])
    assert out["val-num-examples"] == 10
