"""Saliency figures (common/explain.py, `medfed explain`) on a tiny real checkpoint."""

from __future__ import annotations

import dataclasses
import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from common.errors import ConfigError
from common.explain import (
    Decision,
    choose_method,
    decision_threshold,
    explain_arrays,
    last_conv_layer,
    saliency_maps,
    select_cases,
)
from common.models import get_model
from simulation.model_cli import register
from tests.checkpoints import tiny_checkpoint

CPU = torch.device("cpu")


def _no_conv() -> torch.nn.Module:
    """An image classifier without convolutions (like gru/lstm, without importing Opacus)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 2))


def test_select_cases_half_wrong_and_deterministic():
    correct = np.array([True, False, True, True, False, True, False, True, True, False])
    picked = select_cases(correct, n=6, seed=3)
    assert picked.shape == (6,)
    assert correct[picked].sum() == 3 and (~correct[picked]).sum() == 3
    assert len(set(picked.tolist())) == 6
    np.testing.assert_array_equal(picked, select_cases(correct, n=6, seed=3))
    # right ones first (ascending), then the wrong ones (ascending)
    assert list(correct[picked]) == [True] * 3 + [False] * 3
    assert list(picked[:3]) == sorted(picked[:3]) and list(picked[3:]) == sorted(picked[3:])


def test_select_cases_fills_from_the_other_kind_when_one_is_short():
    correct = np.array([True] * 9 + [False])
    picked = select_cases(correct, n=6, seed=0)
    assert (~correct[picked]).sum() == 1 and correct[picked].sum() == 5
    assert select_cases(np.array([True, False]), n=16, seed=0).tolist() == [0, 1]
    with pytest.raises(ConfigError, match="n=0"):
        select_cases(correct, n=0, seed=0)


def test_decision_threshold_from_checkpoint_else_default(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    assert decision_threshold(ckpt, 2) == Decision(0.5, "default")
    with_t = dataclasses.replace(ckpt, operating_point={"threshold": 0.3, "method": "youden"})
    rule = decision_threshold(with_t, 2)
    assert rule == Decision(0.3, "checkpoint")
    probs = np.array([[0.75, 0.25], [0.65, 0.35], [0.2, 0.8]])
    assert rule.predict(probs).tolist() == [0, 1, 1]  # 0.35 >= 0.3: positive
    assert Decision(0.5, "default").predict(probs).tolist() == [0, 0, 1]
    assert decision_threshold(ckpt, 3) == Decision(None, "argmax")
    assert "from the checkpoint" in rule.describe(["normal", "pneumonia"])
    assert "p(pneumonia) >= 0.3" in rule.describe(["normal", "pneumonia"])
    with pytest.raises(ConfigError, match="threshold"):
        decision_threshold(dataclasses.replace(ckpt, operating_point={"threshold": 1.5}), 2)


def test_method_by_model_and_unsupported_models_are_named():
    assert last_conv_layer(get_model("cnn", width=8)) == "features.4"
    assert choose_method(
        get_model("cnn", width=8), task="classification", input_shape=(1, 28, 28)
    ) == (
        "grad-cam",
        "features.4",
    )
    assert last_conv_layer(_no_conv()) is None
    assert choose_method(_no_conv(), task="classification", input_shape=(1, 28, 28)) == (
        "occlusion",
        None,
    )
    with pytest.raises(ConfigError, match="segmentation"):
        choose_method(get_model("unet"), task="segmentation", input_shape=(1, 32, 32))
    with pytest.raises(ConfigError, match="H, W >= 4"):
        choose_method(get_model("heart-mlp"), task="classification", input_shape=(13, 1, 1))


def test_saliency_maps_are_unit_range_and_leave_the_model_alone():
    torch.manual_seed(0)
    images = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    cnn = get_model("cnn", width=8)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    cam = saliency_maps(
        cnn, images, np.array([0, 1]), method="grad-cam", target_layer="features.4", device=CPU
    )
    assert cam.shape == (2, 28, 28) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
    assert not cnn._forward_hooks and not cnn.features[4]._forward_hooks  # hooks on a copy
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    occ = saliency_maps(_no_conv(), images[:1], np.array([1]), method="occlusion", device=CPU)
    assert occ.shape == (1, 28, 28) and occ.min() >= 0.0 and occ.max() <= 1.0
    assert occ.max() == pytest.approx(1.0)  # occluding some patch lowers p(class 1) most


def test_explain_command_writes_a_readable_png_with_right_and_wrong_cases(tmp_path, pneumonia_npz):
    # Prepare: a freshly initialised (so imperfect) CNN saved through save_checkpoint
    ckpt_path = tmp_path / "final_model.pt"
    tiny_checkpoint(ckpt_path)
    app = typer.Typer()
    register(app)
    out = tmp_path / "explain"
    # Execute
    result = CliRunner().invoke(
        app,
        [
            "explain",
            "--checkpoint", str(ckpt_path),
            "--data", str(pneumonia_npz),
            "--split", "val",
            "--out", str(out),
            "--n", "8",
            "--seed", "7",
        ],
    )  # fmt: skip
    # Assert
    assert result.exit_code == 0, result.output
    png = mpimg.imread(out / "explain-val.png")
    assert png.ndim == 3 and png.shape[0] > 300 and png.shape[1] > 600
    rgb = png[..., :3]
    assert rgb.std() > 0.1  # not blank
    assert len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 500
    record = json.loads((out / "explain-val.json").read_text())
    assert record["method"] == "grad-cam" and record["target-layer"] == "features.4"
    assert record["threshold"] == 0.5 and record["threshold-source"] == "default"
    items = record["items"]
    assert len(items) == 8
    assert {i["correct"] for i in items} == {True, False}
    assert sum(not i["correct"] for i in items) == 4
    for i in items:
        assert i["correct"] == (i["true"] == i["predicted"])
        assert i["probability"] == pytest.approx(i["probabilities"][i["predicted"]])
        assert (i["probabilities"][1] >= 0.5) == (i["predicted"] == 1)


def test_explain_refuses_a_segmentation_model_before_any_work(tmp_path):
    images = np.zeros((2, 1, 32, 32), dtype=np.float32)
    with pytest.raises(ConfigError, match="image classification models"):
        explain_arrays(
            get_model("unet", width=4, depth=1),
            images,
            np.zeros(2, dtype=np.int64),
            task="segmentation",
            label_names=["background", "vessel"],
            decision=Decision(None, "argmax"),
            out_dir=tmp_path / "x",
            device=CPU,
        )
    assert not (tmp_path / "x").exists()
