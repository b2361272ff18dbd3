"""Bad input to `medfed simulate` / `medfed evaluate` fails fast with a clear message."""

import json

import pytest
import torch
from typer.testing import CliRunner

from common import cli
from common.checkpoint import Checkpoint, save_checkpoint
from common.models import get_model

runner = CliRunner()
cli._register_plugins()


def _run(*args):
    return runner.invoke(cli.app, list(args))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "local-epoch=2"], "Did you mean 'local-epochs'"),
        (["--set", "model=resnet"], "unknown model 'resnet'"),
        (["--sites", "0"], "--sites must be >= 1"),
        (["--partition", "dirichelt"], "--partition must be one of"),
        (["--data-dir", "/nonexistent"], "pneumoniamnist.npz not found"),
        (
            ["--rounds", "5", "--set", "num-server-rounds=3"],
            "--rounds 5 and --set num-server-rounds=3 disagree",
        ),
        (["--seed", "1", "--set", "seed=2"], "--seed 1 and --set seed=2 disagree"),
        (["--sites", "4", "--set", "min-sites=2"], "--sites 4 and --set min-sites=2 disagree"),
    ],
)
def test_simulate_rejects_bad_input_before_any_work(args, message, tmp_path, shared_data_dir):
    result = _run("simulate", "--run-dir", str(tmp_path / "run"), *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("config", "config key 'num-server-rounds'=0 must be > 0"),
        ("set", "config key 'num-server-rounds'=0 must be > 0"),
    ],
)
def test_simulate_never_replaces_a_given_value_with_an_option_default(
    how, message, tmp_path, shared_data_dir
):
    # A value from --config or --set reaches the run config: no --rounds default (10)
    # silently replaces it (this one is invalid, so the run stops before any work).
    args = ["--set", "num-server-rounds=0"]
    if how == "config":
        (tmp_path / "run.toml").write_text("num-server-rounds = 0\n")
        args = ["--config", str(tmp_path / "run.toml")]
    result = _run("simulate", "--run-dir", str(tmp_path / "run"), *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_simulate_run_config_precedence(capsys):
    from common.errors import ConfigError
    from simulation.cli import _run_config_keys

    def keys(file=None, sets=None, rounds=None, seed=None):
        return _run_config_keys(
            file_keys=file or {},
            set_keys=sets or {},
            options={"num-server-rounds": ("--rounds", rounds), "seed": ("--seed", seed)},
            config=None,
        )

    # the config file's values win over options left out (no CLI defaults)
    assert keys(file={"num-server-rounds": 3, "seed": 7}) == {"num-server-rounds": 3, "seed": 7}
    assert keys() == {}  # the app's defaults (pyproject.toml) apply
    # --set over the file; an option and --set of its key must agree
    assert keys(file={"seed": 7}, sets={"seed": 8}) == {"seed": 8}
    assert keys(sets={"num-server-rounds": 5}, rounds=5) == {"num-server-rounds": 5}
    with pytest.raises(ConfigError, match="--rounds 5 and --set num-server-rounds=3 disagree"):
        keys(sets={"num-server-rounds": 3}, rounds=5)
    # an option given on the command line overrides the file, and says so
    assert keys(file={"seed": 7}, seed=9) == {"seed": 9}
    assert "--seed 9 overrides seed = 7" in " ".join(capsys.readouterr().err.split())


def test_evaluate_prints_json_metrics(tmp_path, pneumonia_npz):
    torch.manual_seed(0)
    model = get_model("cnn")
    save_checkpoint(
        tmp_path / "m.pt",
        Checkpoint(
            model="cnn",
            model_kwargs={"num_classes": 2},
            task="classification",
            state_dict=model.state_dict(),
        ),
    )
    result = _run(
        "evaluate",
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--data",
        str(pneumonia_npz),
        "--split",
        "val",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["num-images"] == 524
    assert {"accuracy", "balanced-accuracy", "auroc", "sensitivity", "specificity", "f1"} <= set(
        out
    )


def test_evaluate_scores_at_the_checkpoints_operating_point(tmp_path, pneumonia_npz):
    # Prepare: a checkpoint whose operating point (as a run stores it) is 0.3
    from common.operating_point import choose_threshold

    torch.manual_seed(0)
    op = choose_threshold([[3.0, 1.0, 0.0, 0.0], [0.0, 1.0, 2.0, 2.0]])  # threshold 0.25
    save_checkpoint(
        tmp_path / "m.pt",
        Checkpoint(
            model="cnn",
            model_kwargs={"num_classes": 2},
            task="classification",
            state_dict=get_model("cnn").state_dict(),
            operating_point=op.as_dict() | {"threshold": 0.3},
        ),
    )
    common = ["evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(pneumonia_npz)]
    # Execute
    result = _run(*common, "--at-default")
    balanced = _run(*common, "--balanced", "--threshold", "0.5")
    # Assert: scored at 0.3 with its source and the confusion matrix; 0.5 beside it
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["threshold"] == 0.3 and "operating point" in out["threshold-source"]
    assert out["tp"] + out["fp"] + out["tn"] + out["fn"] == out["num-images"] == 524
    assert out["at-0.5"]["tp"] <= out["tp"]  # a lower threshold flags at least as many
    # a class-balanced resample: as many normal as pneumonia X-rays (135 normal in val)
    assert balanced.exit_code == 0, balanced.output
    bal = json.loads(balanced.stdout)
    assert bal["num-images"] == 2 * 135 and bal["threshold-source"] == "--threshold"
    assert bal["tp"] + bal["fn"] == bal["tn"] + bal["fp"] == 135


def test_evaluate_on_missing_split_fails_clearly(tmp_path, pneumonia_npz):
    save_checkpoint(
        tmp_path / "m.pt",
        Checkpoint(
            model="cnn",
            model_kwargs={"num_classes": 2},
            task="classification",
            state_dict=get_model("cnn").state_dict(),
        ),
    )
    result = _run(
        "evaluate",
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--data",
        str(pneumonia_npz),
        "--split",
        "test",
    )
    assert result.exit_code == 2
    assert "has no 'test' split" in " ".join(result.output.split())
