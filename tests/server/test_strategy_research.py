"""Strategy registry (server/strategy.py) and the config rules around it."""

import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
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
    assert isinstance(strategy, cls)


def test_registry_and_config_list_the_same_strategies():
    for name in STRATEGIES:
        # momentum 0: SCAFFOLD's option-II update assumes plain local SGD
        build_strategy(RunConfig.from_run_config({"strategy": name, "momentum": 0.0, **PLAIN}))


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


def _reply(value: float) -> Message:
    md = Metadata(
        run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=5,
        reply_to_message_id="", group_id="1", created_at=0.0, ttl=3600.0,
        message_type="train",
    )  # fmt: skip
    sent = Message(RecordDict({}), metadata=md)
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    return Message(content, reply_to=sent)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimisers_keep_the_model_dtype(name, monkeypatch):
    # Flower 1.41's FedAdam/FedYogi return float64 under NumPy 2 promotion; the sites
    # refuse a float64 global model, so medfed casts back to what the sites sent.
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1 if attr == "_run_id" else 0)
    strategy = build_strategy(RunConfig.from_run_config({"strategy": name}))
    strategy.current_arrays = {"w": np.zeros(3, dtype=np.float32)}
    arrays, _ = strategy.aggregate_train(1, [_reply(1.0), _reply(3.0)])
    out = arrays["w"].numpy()
    assert out.dtype == np.float32
    assert np.all(out > 0)  # moved towards the mean update (+2)
