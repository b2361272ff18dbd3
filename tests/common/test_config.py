import tomllib

import pytest
from flwr.common.config import flatten_dict

from common.config import EVAL_BATCH_SIZE, NodeConfig, RunConfig, SecAggConfig
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
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


def test_groups_keep_the_flat_keys():
    # Prepare: one key of every group, with a non-default value
    flat = {
        "local-epochs": 2, "eval-batch-size": 16, "operating-point-bins": 20,
        "min-replies": 2, "strategy": "fedadam", "strategy-args.server-lr": 0.5,
        "dp.noise-multiplier": 1.1, "secagg.neighbours": 4, "faults.crash-site": 1,
        "sites-dir": "/data/sites",
    }  # fmt: skip
    # Execute
    run = RunConfig.from_run_config(flat)
    # Assert: each key lands in its group and the flat dictionary round-trips
    assert (run.train.local_epochs, run.evaluation.batch_size) == (2, 16)
    assert (run.operating_point.bins, run.federation.min_replies) == (20, 2)
    assert (run.strategy.name, run.strategy.server_lr) == ("fedadam", 0.5)
    assert (run.dp.noise_multiplier, run.secagg.neighbours) == (1.1, 4)
    assert (run.faults.crash_site, run.paths.sites_dir) == (1, "/data/sites")
    assert RunConfig.from_run_config(run.to_run_config()) == run
    assert run.to_run_config().items() >= flat.items()
    assert run.override({"dp.enabled": False}).dp.enabled is False
    assert RunConfig().evaluation.batch_size == EVAL_BATCH_SIZE


def test_secagg_group_carries_the_runs_secure_sum_layout():
    # the SecAgg+ settings and what they imply live in one place: run.secagg
    assert RunConfig().secagg.sum_spec == {"score-histogram": (2, 100)}
    assert RunConfig.from_run_config({"operating-point": "none"}).secagg.sum_spec == {}
    assert SecAggConfig(threshold=0.6).shares_needed(10) == 7
    with pytest.raises(ConfigError, match=r"'secagg.threshold'=0.3 must be in \[0.5, 1\)"):
        SecAggConfig(threshold=0.3)
    with pytest.raises(ConfigError, match="'eval-batch-size'=0 must be > 0"):
        RunConfig.from_run_config({"eval-batch-size": 0})


def test_node_config_resolves_dataset_dir(tmp_path):
    run = RunConfig.from_run_config({"sites-dir": str(tmp_path)})
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


def test_model_selection_metric_is_checked_against_the_tasks_metrics():
    # a typo names the closest validation metric of the task
    with pytest.raises(ConfigError, match=r"Did you mean 'val-balanced-accuracy'\?"):
        RunConfig.from_run_config({"model-selection-metric": "val-balanced-acuracy"})
    # a metric of another task is refused, listing the task's own
    with pytest.raises(ConfigError, match=r"for task 'classification'.*'val-auroc'"):
        RunConfig.from_run_config({"model-selection-metric": "val-dice"})
    # a training metric cannot pick a model: the sites do not validate with it
    with pytest.raises(ConfigError, match="model-selection-metric"):
        RunConfig.from_run_config({"model-selection-metric": "train-loss"})
    assert RunConfig().evaluation.selection_metric == "auto"
    for metric in ("val-loss", "val-auroc", "val-balanced-accuracy"):
        assert (
            RunConfig.from_run_config(
                {"model-selection-metric": metric}
            ).evaluation.selection_metric
            == metric
        )
    seg = {"task": "segmentation", "model": "unet", "model-selection-metric": "val-dice"}
    assert RunConfig.from_run_config(seg).evaluation.selection_metric == "val-dice"


# --- issue 13: class weighting and augmentation keys ---------------------------------


def test_class_weighting_and_augment_keys_parse():
    cfg = RunConfig.from_run_config(
        {"class-weighting": "site", "class-weight-max": 5, "augment": "light"}
    )
    assert (cfg.train.class_weighting, cfg.train.class_weight_max, cfg.train.augment) == (
        "site",
        5.0,
        "light",
    )


def test_auto_class_weighting_is_site_for_classification_and_none_for_segmentation():
    assert RunConfig().train.class_weighting == "auto"
    assert RunConfig().class_weight_source() == "site"
    assert RunConfig(task="tabular", model="heart-mlp").class_weight_source() == "site"
    assert RunConfig(task="segmentation", model="unet").class_weight_source() == "none"
    assert RunConfig.from_run_config({"class-weighting": "none"}).class_weight_source() == "none"


def test_federation_class_weighting_adds_the_class_counts_to_the_secure_sums():
    from common import secure_sum

    run = RunConfig.from_run_config({"class-weighting": "federation"})
    assert run.class_weight_source() == "federation"
    assert secure_sum.spec(run)[secure_sum.CLASS_COUNTS] == (2,)
    assert secure_sum.CLASS_COUNTS not in secure_sum.spec(RunConfig())


@pytest.mark.parametrize(
    ("run", "match"),
    [
        ({"class-weighting": "sites"}, "Did you mean 'site'"),
        ({"class-weight-max": 0.5}, "'class-weight-max'=0.5 must be >= 1"),
        ({"augment": "heavy"}, "'augment'='heavy' must be one of"),
        (
            {"task": "segmentation", "model": "unet", "class-weighting": "site"},
            "segmentation loss takes no class weights",
        ),
        ({"task": "segmentation", "model": "unet", "augment": "light"}, "needs task="),
        ({"task": "tabular", "model": "heart-mlp", "augment": "light"}, "needs task="),
    ],
)
def test_bad_class_weighting_or_augment_values_name_the_key(run, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_run_config(run)
