import tomllib

import pytest
from flwr.common.config import flatten_dict

from common.config import NodeConfig, RunConfig
from common.errors import ConfigError, ModelError
from tests.conftest import ROOT


def test_pyproject_defaults_equal_runconfig_defaults():
    # Prepare
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    defaults = flatten_dict(app["config"])  # Flower's own flattening of dotted groups
    # Execute
    parsed = RunConfig.from_run_config(defaults)
    # Assert: one source of truth for every key, and no key missing on either side
    assert set(defaults) == set(RunConfig.keys())
    assert parsed == RunConfig()


def test_typo_in_key_names_the_closest_key():
    with pytest.raises(ConfigError, match="Did you mean 'local-epochs'"):
        RunConfig.from_run_config({"local-epoch": 2})


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match="'batch-size' must be of type int"):
        RunConfig.from_run_config({"batch-size": "32"})


@pytest.mark.parametrize(
    ("key", "value"),
    [("num-server-rounds", 0), ("learning-rate", -0.1), ("fraction-train", 1.5), ("min-sites", 0)],
)
def test_out_of_range_values_fail(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_run_config({key: value})


def test_unknown_model_fails_at_parse_time():
    with pytest.raises(ModelError, match="Did you mean 'cnn'"):
        RunConfig.from_run_config({"model": "cnnn"})


def test_int_is_accepted_for_float_and_round_trips():
    cfg = RunConfig.from_run_config({"learning-rate": 1, "round-timeout": 30})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


def test_node_config_resolves_dataset_dir(tmp_path):
    run = RunConfig(sites_dir=str(tmp_path))
    assert NodeConfig.from_node_config({"partition-id": 2}).resolve_dataset_dir(run) == (
        tmp_path / "site-2"
    )
    explicit = NodeConfig.from_node_config({"dataset-dir": "/data/a", "partition-id": 1})
    assert str(explicit.resolve_dataset_dir(run)) == "/data/a"
    with pytest.raises(ConfigError, match="dataset-dir"):
        NodeConfig.from_node_config({}).resolve_dataset_dir(RunConfig())


def test_node_config_rejects_bad_device():
    with pytest.raises(ConfigError, match="device"):
        NodeConfig.from_node_config({"device": "gpu0"})
