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
    ],
)
def test_simulate_rejects_bad_input_before_any_work(args, message, tmp_path, shared_data_dir):
    result = _run("simulate", "--run-dir", str(tmp_path / "run"), *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


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
