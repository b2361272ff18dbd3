"""Experiment files (simulation/research/experiment.py): parsing, validation, summaries."""

import math

import pytest

from common.errors import ConfigError
from simulation.research.experiment import ExperimentConfig, summarise

BASE = {
    "seeds": [1, 2],
    "rounds": 4,
    "data": {"kind": "medmnist", "splits": [{"partition": "dirichlet", "alpha": 0.1}]},
    "run-config": {"dp": {"enabled": False}, "secagg": {"enabled": False}},
    "federated": [{"label": "prox", "strategy": "fedprox", "strategy-args": {"proximal-mu": 0.5}}],
}


def test_nested_tables_become_dotted_run_config_keys():
    cfg = ExperimentConfig.from_dict(BASE)
    run = cfg.run_config_for(cfg.federated[0], seed=2, num_sites=3)
    assert run.strategy.name == "fedprox"
    assert run.strategy.proximal_mu == 0.5
    assert (run.seed, run.num_server_rounds, run.federation.min_sites) == (2, 4, 3)
    assert not run.dp.enabled
    assert cfg.splits[0].label == "dirichlet-0.1"


def test_bad_settings_fail_before_any_training():
    bad = BASE | {"federated": [{"strategy": "fedmedian", "secagg.enabled": True}]}
    with pytest.raises(ConfigError, match="secagg"):
        ExperimentConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="kind"):
        ExperimentConfig.from_dict(BASE | {"data": {"kind": "csv"}})
    with pytest.raises(ConfigError, match="natural"):
        ExperimentConfig.from_dict(
            BASE | {"data": {"kind": "heart", "splits": [{"partition": "iid"}]}}
        )
    with pytest.raises(ConfigError, match="federated"):
        ExperimentConfig.from_dict(BASE | {"federated": []})


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [
        {
            "kind": "run",
            "split": "iid",
            "setting": "a",
            "strategy": "fedavg",
            "dp": False,
            "max-epsilon": 0.0,
            "federated": f,
            "pooled": 0.8,
            "best-local": 0.5,
            "fed/pooled": f / 0.8,
            "fed/best-local": f / 0.5,
        }
        for f in (0.6, 0.8)
    ]
    (s,) = summarise(rows)
    assert s["federated"] == pytest.approx(0.7)
    assert s["federated-std"] == pytest.approx(math.sqrt(0.02))
    assert s["fed/pooled"] == pytest.approx(0.875)
    assert s["seeds"] == 2
