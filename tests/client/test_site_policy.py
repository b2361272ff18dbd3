"""The site policy (issue 12, item 3): the hospital's file bounds what a coordinator may ask."""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import struct
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.site.policy import (
    RULES,
    STANDARD_METRICS,
    PolicyFileExistsError,
    PolicyRefusal,
    SitePolicy,
    write_default_policy,
)
from common import cli
from common.config import RunConfig, flatten_tables
from common.errors import ConfigError, MedfedError
from common.models import list_models
from common.replies import ReplyCode, fixed_reason

ROOT = Path(__file__).resolve().parents[2]

runner = CliRunner()
cli._register_plugins()


def _demo_run() -> RunConfig:
    """The project's default run config: pyproject.toml [tool.flwr.app.config]."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    return RunConfig.from_run_config(flatten_tables(table))  # type: ignore[arg-type]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site-policy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _words(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------- the file
def test_default_file_loads_back_to_the_default_policy(tmp_path):
    # Prepare
    path = tmp_path / "site-policy.toml"

    # Execute
    written = write_default_policy(path)
    policy = SitePolicy.load(written)

    # Assert
    assert written == path
    assert policy == SitePolicy.default()
    assert policy.digest() == SitePolicy.default().digest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    text = path.read_text()
    for key in SitePolicy.key_help():  # every key is written (delta commented out) ...
        assert f"\n{key} = " in text or f"\n# {key} = " in text
    assert text.count("\n# ") > len(SitePolicy.key_help())  # ... each with its comment


def test_defaults_are_the_documented_safe_values():
    policy = SitePolicy.default()

    assert policy.max_epsilon == 10.0
    assert policy.delta is None
    assert policy.delta_for(1000) == pytest.approx(1e-4)
    assert policy.min_noise_multiplier == 0.5
    assert (policy.max_grad_norm_min, policy.max_grad_norm_max) == (0.1, 10.0)
    assert policy.require_dp and policy.require_secagg
    assert policy.min_secagg_sites == 3
    assert policy.allowed_models == tuple(list_models())
    assert policy.allowed_tasks == ("classification", "segmentation", "tabular")
    assert policy.allowed_projects == ("*",)
    assert (policy.max_rounds, policy.max_local_epochs) == (100, 5)
    assert (policy.max_evaluations_per_run, policy.min_eval_images) == (50, 20)
    assert policy.metric_decimals == 3
    assert policy.allowed_metric_names() == frozenset(STANDARD_METRICS)


def test_a_non_default_policy_round_trips_through_toml(tmp_path):
    # Prepare
    policy = SitePolicy(
        delta=1e-5,
        max_epsilon=4,
        allowed_projects=["study-b", "study-a", "study-a"],
        allowed_models=["cnn"],
        allowed_metrics=["num-examples", "train-loss"],
        metric_decimals=2,
        require_secagg=False,
    )

    # Execute
    loaded = SitePolicy.load(_write(tmp_path, policy.to_toml()))

    # Assert
    assert loaded == policy
    assert loaded.allowed_projects == ("study-a", "study-b")  # sorted, deduplicated
    assert loaded.max_epsilon == 4.0 and isinstance(loaded.max_epsilon, float)
    assert loaded.delta_for(1000) == 1e-5


def test_digest_ignores_layout_comments_and_order(tmp_path):
    # Prepare
    a = _write(tmp_path, '[training]\nallowed-projects = ["b", "a"]\n[privacy]\nmax-epsilon = 8\n')
    b = tmp_path / "b.toml"
    b.write_text(
        '# comment\n[privacy]\nmax-epsilon = 8.0\n[training]\nallowed-projects = ["a", "b"]\n'
    )

    # Execute
    da, db = SitePolicy.load(a).digest(), SitePolicy.load(b).digest()

    # Assert
    assert da == db
    assert da != SitePolicy.default().digest()
    assert len(da) == 64


def test_an_empty_file_is_the_default_policy(tmp_path):
    assert SitePolicy.load(_write(tmp_path, "")) == SitePolicy.default()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[privacy]\nmax-epsilom = 5.0\n", ["'max-epsilom'", "Did you mean 'max-epsilon'"]),
        ("[privcy]\nmax-epsilon = 5.0\n", ["'privcy'", "Did you mean 'privacy'"]),
        ("max-epsilon = 5.0\n", ["'max-epsilon'", "[privacy]"]),
        ("[training]\nmax-epsilon = 5.0\n", ["belongs in [privacy]"]),
        ('[privacy]\nrequire-dp = "yes"\n', ["'require-dp'", "true or false"]),
        ("[privacy]\nmax-epsilon = true\n", ["'max-epsilon'", "must be a number"]),
        ("[privacy]\nmax-epsilon = 0.0\n", ["'max-epsilon'", "must be > 0"]),
        ("[privacy]\nmax-epsilon = inf\n", ["'max-epsilon'", "finite"]),
        ("[privacy]\ndelta = 1.5\n", ["'delta'", "(0, 1)"]),
        ("[privacy]\nmax-grad-norm-min = 5.0\nmax-grad-norm-max = 1.0\n", ["max-grad-norm-min"]),
        ("[secure-aggregation]\nmin-secagg-sites = 1\n", ["'min-secagg-sites'", ">= 2"]),
        ("[secure-aggregation]\nmin-secagg-sites = 3.0\n", ["'min-secagg-sites'", "whole"]),
        ('[training]\nallowed-models = ["cnnn"]\n', ["allowed-models", "Did you mean 'cnn'"]),
        ('[training]\nallowed-tasks = ["segmentaton"]\n', ["Did you mean 'segmentation'"]),
        ("[training]\nallowed-models = []\n", ["'allowed-models'", "at least one"]),
        ('[training]\nallowed-projects = "*"\n', ["'allowed-projects'", "list of names"]),
        ('[training]\nallowed-projects = ["*", "a"]\n', ["'allowed-projects'", "mixes"]),
        ('[egress]\nallowed-metrics = ["train-loss"]\n', ["'allowed-metrics'", "num-examples"]),
        ('[egress]\nallowed-metrics = ["num-examples", "A B"]\n', ["'allowed-metrics'"]),
        ("[egress]\nmetric-decimals = 9\n", ["'metric-decimals'", "[0, 6]"]),
        ("[evaluation]\nmin-eval-images = 0\n", ["'min-eval-images'", "> 0"]),
        ("version = 2\n", ["'version'=2", "version 1"]),
        ("[privacy\n", ["not valid TOML"]),
    ],
)
def test_a_bad_file_fails_naming_the_file_the_key_and_the_fix(tmp_path, text, expected):
    # Prepare
    path = _write(tmp_path, text)

    # Execute
    with pytest.raises(ConfigError) as info:
        SitePolicy.load(path)

    # Assert
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_a_missing_file_says_how_to_create_one(tmp_path):
    with pytest.raises(ConfigError, match="medfed site policy init"):
        SitePolicy.load(tmp_path / "absent.toml")


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="max-rounds"):
        SitePolicy(max_rounds=0)


# ----------------------------------------------------------------------------- init
def test_init_refuses_to_overwrite_an_existing_file(tmp_path):
    # Prepare
    path = _write(tmp_path, "[privacy]\nmax-epsilon = 2.0\n")

    # Execute
    with pytest.raises(PolicyFileExistsError, match="never overwritten"):
        write_default_policy(path)

    # Assert
    assert path.read_text() == "[privacy]\nmax-epsilon = 2.0\n"


@pytest.mark.parametrize("target_exists", [True, False])
def test_init_does_not_follow_a_planted_symlink(tmp_path, target_exists):
    # Prepare
    target = tmp_path / "elsewhere" / "victim.txt"
    target.parent.mkdir()
    if target_exists:
        target.write_text("precious")
    link = tmp_path / "site-policy.toml"
    link.symlink_to(target)

    # Execute
    with pytest.raises(PolicyFileExistsError):
        write_default_policy(link)

    # Assert
    assert link.is_symlink()
    if target_exists:
        assert target.read_text() == "precious"
    else:
        assert not target.exists()


def test_init_into_a_missing_folder_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_default_policy(tmp_path / "no" / "site-policy.toml")


# ----------------------------------------------------------------------------- run checks
def test_the_default_policy_allows_the_demo():
    """`make demo`: DP on, sigma from target epsilon 8 over 10 rounds, SecAgg+ over 3 sites."""
    # Prepare
    from client.privacy import plan_round

    policy = SitePolicy.default()
    run = _demo_run().override({"local-epochs": 3})  # the Makefile's demo sets it
    # A site holding all 4708 PneumoniaMNIST training images needs the least noise of
    # any demo partition (sigma falls as N grows at fixed epsilon and delta).
    n = 4708
    plan = plan_round(
        num_examples=n,
        batch_size=run.train.batch_size,
        local_epochs=run.train.local_epochs,
        num_rounds=run.num_server_rounds,
        max_grad_norm=run.dp.max_grad_norm,
        delta=policy.delta_for(n),
        accountant=run.dp.accountant,
        noise_multiplier=None,
        target_epsilon=run.dp.target_epsilon,
    )
    reply = {
        "num-examples": 1569,
        "train-loss": 0.41234,
        "train-steps": 50,
        "train-seconds": 12.3456,
        "epsilon": 2.34567,
        "delta": 6.4e-5,
        "dp-noise-multiplier": plan.noise_multiplier,
        "val-loss": 0.3,
        "val-accuracy": 0.9,
        "val-auroc": 0.97,
    }

    # Execute: nothing raises
    for message_type in ("train", "evaluate", "query"):
        policy.check_run(run, message_type=message_type)
    policy.check_noise_multiplier(plan.noise_multiplier)
    policy.check_secagg_sites(run.federation.min_sites)
    policy.check_evaluation(evaluations_so_far=run.num_server_rounds - 1, num_images=100)
    rounded = policy.round_metrics(reply)

    # Assert
    assert run.dp.enabled and run.secagg.enabled and run.federation.min_sites == 3
    assert plan.noise_multiplier > policy.min_noise_multiplier
    assert rounded.keys() == reply.keys()


@pytest.mark.parametrize(
    ("policy_changes", "run_changes", "message_type", "rule"),
    [
        ({}, {"dp.reproducible-noise": True}, "train", "require-secret-noise"),
        ({}, {"dp.enabled": False}, "train", "require-dp"),
        ({}, {"dp.enabled": False}, "evaluate", "require-dp"),
        ({}, {"dp.noise-multiplier": 0.3}, "train", "min-noise-multiplier"),
        ({}, {"dp.max-grad-norm": 0.05}, "train", "max-grad-norm-min"),
        ({}, {"dp.max-grad-norm": 20.0}, "train", "max-grad-norm-max"),
        ({}, {"secagg.enabled": False}, "train", "require-secagg"),
        ({"allowed_models": ["cnn"]}, {"model": "gru"}, "train", "allowed-models"),
        ({"allowed_tasks": ["classification"]}, {"task": "segmentation"}, "query", "allowed-tasks"),
        ({"allowed_projects": ["study-a"]}, {"project": "study-b"}, "train", "allowed-projects"),
        ({}, {"num-server-rounds": 101}, "train", "max-rounds"),
        ({}, {"local-epochs": 6}, "train", "max-local-epochs"),
        ({}, {}, "get_parameters", "message-type"),
    ],
)
def test_check_run_refuses_what_the_policy_forbids_and_names_the_rule(
    policy_changes, run_changes, message_type, rule
):
    # Prepare
    policy = SitePolicy(**policy_changes)
    run = RunConfig().override(run_changes)

    # Execute
    with pytest.raises(PolicyRefusal) as info:
        policy.check_run(run, message_type=message_type)

    # Assert
    assert info.value.rule == rule
    assert rule in RULES
    assert info.value.reply_reason == fixed_reason(ReplyCode.POLICY, rule)


@pytest.mark.parametrize(
    ("policy_changes", "run_changes"),
    [
        ({"require_dp": False}, {"dp.enabled": False}),
        ({"require_secagg": False}, {"secagg.enabled": False}),
        ({}, {"dp.noise-multiplier": 0.5, "dp.max-grad-norm": 10.0}),  # bounds are inclusive
        ({}, {"num-server-rounds": 100, "local-epochs": 5}),
        ({"allowed_projects": ["study-a"]}, {"project": "study-a"}),
        ({"min_noise_multiplier": 0.0}, {"dp.noise-multiplier": 0.1}),
    ],
)
def test_check_run_allows_what_the_policy_allows(policy_changes, run_changes):
    SitePolicy(**policy_changes).check_run(
        RunConfig().override(run_changes), message_type="train.secagg"
    )


def test_reproducible_noise_is_accepted_only_by_a_simulated_site(caplog):
    run = RunConfig().override({"dp.reproducible-noise": True})

    SitePolicy.default().check_run(run, message_type="train", simulated=True)

    assert "NOT PRIVATE" in caplog.text
    with pytest.raises(PolicyRefusal, match="never accepts"):
        SitePolicy(require_dp=False).check_run(run, message_type="train")


@pytest.mark.parametrize(("sigma", "refused"), [(0.49, True), (0.5, False), (math.nan, True)])
def test_check_noise_multiplier_enforces_the_floor(sigma, refused):
    policy = SitePolicy.default()

    if refused:
        with pytest.raises(PolicyRefusal) as info:
            policy.check_noise_multiplier(sigma)
        assert info.value.rule == "min-noise-multiplier"
    else:
        policy.check_noise_multiplier(sigma)


def test_check_secagg_sites_needs_the_minimum_aggregate():
    policy = SitePolicy.default()

    policy.check_secagg_sites(3)
    with pytest.raises(PolicyRefusal) as info:
        policy.check_secagg_sites(2)

    assert info.value.rule == "min-secagg-sites"


@pytest.mark.parametrize(
    ("policy_changes", "so_far", "images", "rule"),
    [
        ({}, 50, 100, "max-evaluations-per-run"),
        ({}, 0, 19, "min-eval-images"),
        ({"max_evaluations_per_run": 0}, 0, 100, "max-evaluations-per-run"),
        ({}, 49, 20, None),
    ],
)
def test_check_evaluation_limits_count_and_size(policy_changes, so_far, images, rule):
    policy = SitePolicy(**policy_changes)

    if rule is None:
        policy.check_evaluation(evaluations_so_far=so_far, num_images=images)
        return
    with pytest.raises(PolicyRefusal) as info:
        policy.check_evaluation(evaluations_so_far=so_far, num_images=images)
    assert info.value.rule == rule


def test_check_evaluation_rejects_negative_counts_as_a_bug():
    with pytest.raises(ValueError, match=">= 0"):
        SitePolicy.default().check_evaluation(evaluations_so_far=-1, num_images=100)


# ----------------------------------------------------------------------------- metrics
def test_round_metrics_rounds_floats_keeps_ints_and_drops_nothing():
    # Prepare
    policy = SitePolicy.default()
    nan_with_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_00AB_CDEF))[0]
    values = {
        "val-accuracy": 2 / 3,
        "val-auroc": 0.123456,
        "train-loss": -0.0001,
        "train-steps": 49,
        "val-dice": nan_with_payload,
    }

    # Execute
    out = policy.round_metrics(values)

    # Assert
    assert out.keys() == values.keys()
    assert out["val-accuracy"] == 0.667
    assert out["val-auroc"] == 0.123
    assert out["train-loss"] == 0.0 and math.copysign(1.0, out["train-loss"]) == 1.0
    assert out["train-steps"] == 49 and isinstance(out["train-steps"], int)
    assert math.isnan(out["val-dice"])
    assert struct.pack("<d", out["val-dice"]) == struct.pack("<d", math.nan)  # payload gone


def test_round_metrics_follows_metric_decimals():
    assert SitePolicy(metric_decimals=1).round_metrics({"val-auroc": 0.96}) == {"val-auroc": 1.0}


@pytest.mark.parametrize(
    "values", [{"val-pixel-0": 1.0}, {"val-accuracy": True}, {"val-accuracy": [0.1, 0.2]}]
)
def test_round_metrics_refuses_names_and_values_outside_the_allow_list(values):
    with pytest.raises(PolicyRefusal) as info:
        SitePolicy.default().round_metrics(values)

    assert info.value.rule == "allowed-metrics"


# ----------------------------------------------------------------------------- refusal
def test_policy_refusal_is_a_permission_error_carrying_only_a_vocabulary_rule():
    refusal = PolicyRefusal("num-server-rounds=500 is above max-rounds=100", rule="max-rounds")

    copy = pickle.loads(pickle.dumps(refusal))

    assert isinstance(refusal, PermissionError) and isinstance(refusal, MedfedError)
    assert str(refusal) == "num-server-rounds=500 is above max-rounds=100"
    assert (copy.rule, str(copy)) == ("max-rounds", str(refusal))
    assert refusal.reply_reason == "site policy refuses the request: max-rounds"
    with pytest.raises(ValueError, match="vocabulary"):
        PolicyRefusal("x", rule="/etc/passwd")


# ----------------------------------------------------------------------------- CLI
def _run(*args: str):
    return runner.invoke(cli.app, ["site", "policy", *args])


def test_cli_init_show_check(tmp_path):
    # Prepare
    path = tmp_path / "site-policy.toml"

    # Execute
    init = _run("init", str(path))
    again = _run("init", str(path))
    show = _run("show", str(path))
    show_json = _run("show", "--json", str(path))
    check = _run("check", str(path))

    # Assert
    digest = SitePolicy.default().digest()
    assert init.exit_code == 0, init.output
    assert "policy check" in init.output and digest in init.output
    assert again.exit_code == 2
    assert "already exists" in _words(again.output)
    assert show.exit_code == 0, show.output
    assert "max-epsilon" in show.output and digest in show.output
    body = json.loads(show_json.stdout)
    assert body["digest"] == digest
    assert body["policy"]["privacy"]["max-epsilon"] == 10.0
    assert check.exit_code == 0 and digest in check.output


def test_cli_check_reports_a_typo_without_a_traceback(tmp_path):
    path = _write(tmp_path, "[evaluation]\nmax-evaluations-per-rum = 5\n")

    result = _run("check", str(path))

    assert result.exit_code == 2
    assert "Did you mean 'max-evaluations-per-run'" in _words(result.output)
    assert "[evaluation]" in result.output  # not eaten as rich markup
    assert "Traceback" not in result.output


def test_cli_help_teaches(tmp_path):
    result = _run("--help")

    assert result.exit_code == 0
    words = _words(result.output)
    for command in ("init", "show", "check"):
        assert command in words
    assert "before any work" in words


def test_init_creates_the_file_with_the_default_mode_even_under_a_strict_umask(tmp_path):
    old = os.umask(0o077)
    try:
        path = write_default_policy(tmp_path / "p.toml")
    finally:
        os.umask(old)

    assert stat.S_IMODE(path.stat().st_mode) == 0o640
