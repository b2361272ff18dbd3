"""Bad input is a clear error before any work, never a traceback (issue 16, item 7).

Each test runs the real command through typer's ``CliRunner`` (or the config check the
commands call) and asserts a non-zero exit, a message that says what is wrong and what
to do, no exception escaping and no "Traceback" in the output.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import typer
from click.testing import Result
from typer.testing import CliRunner

import common.checkpoint as checkpoint_module
from client.privacy_cli import MAX_FORECAST_ROUNDS, forecast_rows
from client.privacy_cli import register as register_budget
from common.checkpoint import FORMAT, VERSION, Checkpoint, load_checkpoint, save_checkpoint
from common.config import MAX_SEED, RunConfig, check_writable_dir, load_config_file
from common.errors import ConfigError, DataError
from common.models import get_model
from simulation.cli import register as register_research
from simulation.deploy_cli import register as register_deploy
from tests.cli_errors import assert_refused

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Keep sub-command names."""

    register_research(app)
    register_budget(app)
    register_deploy(app)
    return app


APP = _app()


def _run(*args: str) -> Result:
    return runner.invoke(APP, list(args))


# ---------------------------------------------------------------- medfed evaluate
def _payload() -> dict[str, Any]:
    """What :func:`save_checkpoint` writes for an untrained CNN."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": "cnn",
        "model-kwargs": {"num_classes": 2},
        "task": "classification",
        "label-names": ["normal", "pneumonia"],
        "round": 3,
        "run-config": {"seed": 1},
        "metrics": {"accuracy": 0.5},
        "state-dict": get_model("cnn").state_dict(),
    }


def _evaluate(ckpt: Path, tmp_path: Path) -> Result:
    # The data is never reached: the checkpoint is checked first.
    return _run("evaluate", "--checkpoint", str(ckpt), "--data", str(tmp_path / "none.npz"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model-kwargs": None}, "lacks the field 'model-kwargs'"),
        ({"state-dict": None}, "lacks the field 'state-dict'"),
        ({"round": None}, "lacks the field 'round'"),
        (
            {"model-kwargs": {"num_classes": 2, "dropout": 0.5}},
            "model 'cnn' has no argument 'dropout'",
        ),
        ({"model-kwargs": {"num_classes": [2]}}, "entry 'num_classes' is list [2]"),
        ({"model-kwargs": {"num_classes": True}}, "'num_classes' must be of type int"),
        ({"round": [3]}, "field 'round' must be an integer >= 0"),
        ({"model": ["cnn"]}, "field 'model' must be a registered model name"),
        ({"label-names": "normal"}, "field 'label-names' must be a list of strings"),
        ({"metrics": {"accuracy": [0.5]}}, "field 'metrics' must be a table of numbers"),
        ({"model-kwargs": {"num_classes": 10**9}}, "num_classes=1000000000 is outside [1, 10000]"),
        ({"model-kwargs": {"num_classes": 10_000, "width": 1024}}, "checkpoint limit"),
        ({"task": "segmentation"}, "model 'cnn' solves 'classification'"),
        ({"model": "resnet"}, "unknown model 'resnet'"),
    ],
    ids=[
        "missing-kwargs",
        "missing-state",
        "missing-round",
        "unknown-argument",
        "list-num-classes",
        "bool-num-classes",
        "list-round",
        "list-model",
        "string-labels",
        "list-metric",
        "absurd-num-classes",
        "model-too-large",
        "wrong-task",
        "unknown-model",
    ],
)
def test_evaluate_refuses_a_malformed_checkpoint_before_building_the_model(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    # Prepare: loadable with torch.load(weights_only=True), malformed for medfed
    raw = _payload()
    for key, value in change.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    torch.save(raw, tmp_path / "bad.pt")
    # Execute
    result = _evaluate(tmp_path / "bad.pt", tmp_path)
    # Assert
    assert_refused(result, message)


def _bomb(path: Path, inflated: int) -> None:
    """A real checkpoint re-zipped with deflate plus an entry inflating to ``inflated``."""
    torch.save(_payload(), path.with_suffix(".plain"))
    with (
        zipfile.ZipFile(path.with_suffix(".plain")) as src,
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst,
    ):
        prefix = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        chunk = bytes(1 << 20)
        with dst.open(f"{prefix}/data/999", "w", force_zip64=True) as fh:
            for _ in range(inflated // len(chunk)):
                fh.write(chunk)
    path.with_suffix(".plain").unlink()


def test_evaluate_refuses_an_archive_that_inflates_before_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: 300 MB of zeros compressed to a few hundred kB
    _bomb(tmp_path / "bomb.pt", 300 * 2**20)
    assert (tmp_path / "bomb.pt").stat().st_size < 2 * 2**20

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must not run on this file")

    monkeypatch.setattr(torch, "load", no_load)
    # Execute
    result = _evaluate(tmp_path / "bomb.pt", tmp_path)
    # Assert
    assert_refused(result, "inflates from", "to 314572800 bytes", "torch.save does not compress")


def test_declared_size_above_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a genuine (stored, uncompressed) checkpoint and a tiny limit
    save_checkpoint(
        tmp_path / "m.pt",
        Checkpoint(
            model="cnn",
            model_kwargs={"num_classes": 2},
            task="classification",
            state_dict=get_model("cnn").state_dict(),
        ),
    )
    monkeypatch.setattr(checkpoint_module, "MAX_CHECKPOINT_BYTES", 4096)
    # Execute / Assert
    with pytest.raises(DataError, match="byte limit for a medfed checkpoint"):
        load_checkpoint(tmp_path / "m.pt")


def test_a_checkpoint_medfed_wrote_still_loads(tmp_path: Path) -> None:
    # Prepare
    model = get_model("unet", num_classes=3)
    save_checkpoint(
        tmp_path / "u.pt",
        Checkpoint(
            model="unet",
            model_kwargs={"num_classes": 3},
            task="segmentation",
            state_dict=model.state_dict(),
            label_names=["bg", "a", "b"],
            run_config=RunConfig(model="unet", task="segmentation").to_run_config(),
            metrics={"dice": 0.5},
        ),
    )
    # Execute
    ckpt = load_checkpoint(tmp_path / "u.pt")
    # Assert
    rebuilt = ckpt.build_model()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in rebuilt.state_dict().items())


# ---------------------------------------------------------------- --config files
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no such file; pass a TOML file of run-config keys"),
        (lambda p: (p.mkdir(), p)[1], "is not a regular file"),
        (lambda p: (p.write_bytes(b"\xff\xfe\x00\x81 binary"), p)[1], "is not UTF-8 text"),
        (lambda p: (p.write_text("local-epochs = = 2\n"), p)[1], "is not valid TOML"),
        (
            lambda p: (p.write_text('project = "a\\nb"\n'), p)[1],
            "must be 1-64 letters, digits",
        ),
    ],
    ids=["missing", "directory", "binary", "not-toml", "bad-project"],
)
def test_simulate_config_file_problems_are_clear_errors(
    tmp_path: Path, make: Any, message: str
) -> None:
    # Prepare
    config = make(tmp_path / "run.toml")
    # Execute
    result = _run("simulate", "--run-dir", str(tmp_path / "run"), "--config", str(config))
    # Assert: nothing started, nothing written
    assert_refused(result, message)
    assert not (tmp_path / "run").exists()


def test_config_file_loader_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config .* no such file"):
        load_config_file(tmp_path / "absent.toml")
    (tmp_path / "ok.toml").write_text('local-epochs = 2\nproject = "x"\n')
    assert load_config_file(tmp_path / "ok.toml") == {"local-epochs": 2, "project": "x"}


# ---------------------------------------------------------------- unwritable run dirs
def test_run_dir_under_a_regular_file_is_refused_before_any_work(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    # Prepare: works as root too (root ignores modes, not a file in the way)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # Execute
    result = _run("simulate", "--data-dir", str(shared_data_dir), "--run-dir", str(blocker / "run"))
    # Assert
    assert_refused(result, "run directory", "is not a directory; choose another --run-dir")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into a 0500 folder; the regular-file case covers root"
)
def test_run_dir_in_a_read_only_folder_is_refused_before_any_work(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    # Prepare
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        # Execute
        result = _run(
            "simulate", "--data-dir", str(shared_data_dir), "--run-dir", str(parent / "run")
        )
        # Assert
        assert_refused(result, "is not writable", "--run-dir")
        assert not (parent / "run").exists()
    finally:
        parent.chmod(0o700)


def test_permission_denied_is_a_clear_error_also_where_root_cannot_see_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: what a 0500 folder (or a read-only mount) answers a non-root user
    import tempfile

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"is not writable \(.*: Permission denied\)"):
        check_writable_dir(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_writability_check_creates_nothing(tmp_path: Path) -> None:
    check_writable_dir(tmp_path / "a" / "b" / "run")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_writable_dir(tmp_path / "f" / "run")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="broken symbolic link"):
        check_writable_dir(tmp_path / "dangling" / "run")


def test_deploy_local_checks_its_folder_and_run_config_before_any_work(tmp_path: Path) -> None:
    # Prepare
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # Execute / Assert: a folder that cannot be created
    result = _run("deploy-local", "--deploy-dir", str(blocker / "deploy"))
    assert_refused(result, "deployment folder", "is not a directory")
    # Execute / Assert: a quorum that no round could reach, refused before keys or data
    result = _run("deploy-local", "--deploy-dir", str(tmp_path / "d"), "--min-replies", "5")
    assert_refused(result, "'min-replies'=5 exceeds 'min-sites'=3")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- medfed budget forecast
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-epsilon", "-1"], "--target-epsilon must be a finite number > 0, got -1.0"),
        (["--target-epsilon", "nan"], "--target-epsilon must be a finite number > 0, got nan"),
        (["--target-epsilon", "inf"], "--target-epsilon must be a finite number > 0, got inf"),
        (["--rounds", str(10**9)], "--rounds must be between 1 and 100000"),
        (["--rounds", "0"], "--rounds must be between 1 and 100000"),
        (["--epochs", str(10**6)], "--epochs must be between 1 and 1000"),
        (["--noise-multiplier", "-1"], "--noise-multiplier must be a finite number >= 0"),
        (["--noise-multiplier", "nan"], "--noise-multiplier must be a finite number >= 0"),
        (["--delta", "1.5"], "--delta must be in [0, 1)"),
        (["--delta", "nan"], "--delta must be in [0, 1)"),
        (["--accountant", "gdp"], "--accountant must be one of ['rdp', 'prv']"),
    ],
    ids=[
        "negative-target",
        "nan-target",
        "inf-target",
        "billion-rounds",
        "zero-rounds",
        "million-epochs",
        "negative-sigma",
        "nan-sigma",
        "delta-above-1",
        "nan-delta",
        "accountant",
    ],
)
def test_budget_forecast_refuses_out_of_range_plans(args: list[str], message: str) -> None:
    # Execute
    result = _run("budget", "forecast", "--examples", "3000", *args)
    # Assert
    assert_refused(result, message)


def test_budget_forecast_of_the_longest_plan_shows_sampled_rounds() -> None:
    # Execute
    result = _run(
        "budget",
        "forecast",
        "--examples",
        "3000",
        "--rounds",
        str(MAX_FORECAST_ROUNDS),
        "--noise-multiplier",
        "5",
    )
    # Assert
    assert result.exit_code == 0, result.output
    assert f"20 of {MAX_FORECAST_ROUNDS} rounds shown" in " ".join(result.output.split())
    rows = forecast_rows(MAX_FORECAST_ROUNDS)
    assert len(rows) == 20 and rows[0] == 1 and rows[-1] == MAX_FORECAST_ROUNDS
    assert forecast_rows(7) == list(range(1, 8))


# ---------------------------------------------------------------- seed, project, classes
@pytest.mark.parametrize("seed", [2**62, 2**32, -1])
def test_seed_outside_what_every_consumer_accepts_is_refused(seed: int) -> None:
    with pytest.raises(ConfigError, match=r"config key 'seed'=.* must be in \[0, 4294967295\]"):
        RunConfig(seed=seed)


def test_largest_seed_is_accepted_by_every_consumer() -> None:
    from client.faults import drops_out
    from client.privacy import DPRandomness
    from client.site.handlers import _round_seed
    from simulation.data.partition import iid_partition

    run = RunConfig(seed=MAX_SEED)
    torch.manual_seed(run.seed)  # server/app.py, client/site/handlers.py, pooled.py
    job = SimpleNamespace(run=run, server_round=10**6, node=SimpleNamespace(partition_id=999))
    round_seed = _round_seed(job)  # type: ignore[arg-type]
    torch.Generator().manual_seed(round_seed)
    DPRandomness.seeded(round_seed, torch.device("cpu"))  # seeds round_seed + 7
    drops_out(probability=0.5, seed=run.seed, server_round=10**6, partition_id=999)
    iid_partition(np.zeros(10, dtype=np.int64), 2, seed=run.seed + 1)
    assert round_seed + 7 < 2**53


def test_simulate_refuses_a_huge_seed_before_any_work(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    result = _run(
        "simulate",
        "--data-dir",
        str(shared_data_dir),
        "--run-dir",
        str(tmp_path / "run"),
        "--seed",
        str(2**62),
    )
    assert_refused(result, "config key 'seed'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "project",
    ['a"b', "line\nbreak", "has space", "", "../etc", "-lead", "x" * 65, "ümlaut", "a'b"],
)
def test_project_name_that_flower_or_a_site_would_choke_on_is_refused(project: str) -> None:
    with pytest.raises(ConfigError, match="config key 'project'") as info:
        RunConfig(project=project)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("project", ["medfed-demo", "Chest_Xray.2025", "x" * 64, "7"])
def test_plain_project_names_pass(project: str) -> None:
    assert RunConfig(project=project).project == project


def test_simulate_refuses_a_bad_project_before_any_site_is_written(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    result = _run(
        "simulate",
        "--data-dir",
        str(shared_data_dir),
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        'project="study \\"x\\""',
    )
    assert_refused(result, "config key 'project'", "must be 1-64 letters, digits")
    assert not (tmp_path / "run").exists()


def test_absurd_num_classes_is_refused_at_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"'num-classes'=1000000000 must be in \[1, 10000\]"):
        RunConfig(num_classes=10**9)
    assert math.isfinite(RunConfig(num_classes=10_000).num_classes)
