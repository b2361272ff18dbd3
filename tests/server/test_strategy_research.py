"""Strategy registry (server/strategy.py) and the config rules around it."""

import pytest
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from common.config import STRATEGIES, RunConfig
from common.errors import ConfigError
from server.strategy import build_strategy

PLAIN = {"secagg.enabled": False, "dp.enabled": False}


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("fedavg", FedAvg),
        ("fedprox", FedProx),
        ("fedadam", FedAdam),
        ("fedyogi", FedYogi),
        ("fedmedian", FedMedian),
        ("fedtrimmedavg", FedTrimmedAvg),
        ("krum", Krum),
    ],
)
def test_every_configured_strategy_builds(name, cls):
    strategy = build_strategy(RunConfig.from_run_config({"strategy": name, **PLAIN}))
    assert type(strategy) is cls


def test_registry_and_config_list_the_same_strategies():
    for name in STRATEGIES:
        build_strategy(RunConfig.from_run_config({"strategy": name, **PLAIN}))


def test_hyper_parameters_reach_the_strategy():
    run = RunConfig.from_run_config(
        {
            "strategy": "fedprox",
            "strategy-args.proximal-mu": 0.3,
            **PLAIN,
        }
    )
    assert build_strategy(run).proximal_mu == 0.3
    trimmed = build_strategy(
        RunConfig.from_run_config(
            {"strategy": "fedtrimmedavg", "strategy-args.trim-beta": 0.1, **PLAIN}
        )
    )
    assert trimmed.beta == 0.1
    adam = build_strategy(
        RunConfig.from_run_config({"strategy": "fedadam", "strategy-args.server-lr": 0.02})
    )
    assert adam.eta == 0.02


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_nonlinear_strategies_refuse_secure_aggregation(name):
    with pytest.raises(ConfigError, match=r"secagg\.enabled=false"):
        RunConfig.from_run_config({"strategy": name, "secagg.enabled": True})


def test_fedprox_refuses_dp():
    with pytest.raises(ConfigError, match="proximal term"):
        RunConfig.from_run_config({"strategy": "fedprox", "dp.enabled": True})
