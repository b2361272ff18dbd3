"""`medfed export` (common/export.py): raw stored images through the export == PyTorch."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from common.evaluation import predict_proba
from common.export import (
    CARD_FILE,
    CheckBatch,
    ExportError,
    Preprocess,
    export_model,
    is_exported,
    load_exported,
    load_model_file,
    onnx_available,
)
from common.tasks import get_task
from simulation.data.datasets import load_medmnist_split, to_model_images
from simulation.research.model_tools import check_batches, load_split
from tests.checkpoints import tiny_checkpoint

CPU = torch.device("cpu")
CARD = {"format": "medfed-model-card", "note": "test"}


def test_preprocess_reproduces_the_training_pipeline_bit_for_bit(pneumonia_npz):
    raw, _ = load_medmnist_split(pneumonia_npz, "val")
    raw = raw[:64]
    grey = Preprocess(channels=1, accept_uint8=True)(torch.from_numpy(raw)).numpy()
    np.testing.assert_array_equal(grey, to_model_images(raw))  # exact, not approximate
    colour = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    out = Preprocess(channels=3, accept_uint8=True)(torch.from_numpy(colour)).numpy()
    np.testing.assert_array_equal(out, to_model_images(colour))  # (N, H, W, C) -> NCHW
    floats = to_model_images(raw)
    np.testing.assert_array_equal(
        Preprocess(channels=1, accept_uint8=True)(torch.from_numpy(floats)).numpy(), floats
    )
    with pytest.raises(RuntimeError, match="float32"):
        Preprocess(channels=13, accept_uint8=False)(torch.zeros(2, 13, 1, 1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="channels"):
        Preprocess(channels=3, accept_uint8=True)(torch.from_numpy(raw))
    with pytest.raises(RuntimeError, match="images must be 32 x 32, got 28 x 28"):
        Preprocess(channels=1, accept_uint8=True, size=(32, 32))(torch.from_numpy(raw))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pneumonia_npz):
    """A tiny CNN checkpoint exported with checks on the real val split's raw images."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(tmp / "final_model.pt")
    data = load_split(ckpt, pneumonia_npz, "val")
    result = export_model(
        ckpt, tmp / "out", checks=check_batches(ckpt, data, n=16), card=CARD, tolerance=1e-5
    )
    return ckpt, data, result


def test_export_matches_pytorch_on_raw_dataset_images(exported):
    ckpt, data, result = exported
    # the command's own check: every batch (synthetic uint8/float32 and the real raw images)
    assert set(result.diffs) == {
        "torchscript / synthetic uint8",
        "torchscript / synthetic float32",
        f"torchscript / {data.source}",
    }
    assert max(result.diffs.values()) <= 1e-6
    # independently: the RAW uint8 images (N, 28, 28) into the export, the normalised
    # (N, 1, 28, 28) tensor into the PyTorch model
    module, card = load_exported(result.torchscript)
    raw = data.raw[:100]
    assert raw.dtype == np.uint8 and raw.shape == (100, 28, 28)
    with torch.no_grad():
        got = module(torch.from_numpy(np.array(raw))).numpy()
    want = predict_proba(ckpt.build_model(), to_model_images(raw), device=CPU)
    assert got.shape == (100, 2) and got.dtype == np.float32
    assert np.max(np.abs(got - want)) <= 1e-6
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
    assert card == result.card == json.loads(result.card_path.read_text())
    assert card["note"] == "test"
    assert card["equivalence"]["max"] <= 1e-6 and card["equivalence"]["tolerance"] == 1e-5
    assert [a["dtype"] for a in card["input"]["accepts"]] == ["uint8", "float32"]
    assert card["input"]["accepts"][0]["shape"] == "(N, 28, 28)"
    assert card["files"] == {"torchscript": "model.ts", "onnx": None, "onnx-input": None}
    with pytest.raises(torch.jit.Error, match="images must be 28 x 28"):
        module(torch.zeros(1, 32, 32, dtype=torch.uint8))  # e.g. a 32 x 32 MedMNIST+ file


def test_evaluate_scores_the_export_like_the_checkpoint(exported):
    ckpt, data, result = exported
    assert is_exported(result.torchscript) and not is_exported(result.torchscript.parent.parent)
    meta, model = load_model_file(result.torchscript)
    assert (meta.model, meta.task, meta.round) == ("cnn", "classification", ckpt.round)
    images, labels = data.images[:128], data.labels[:128]
    from_export = get_task(meta.task).evaluate(model, images, labels, device=CPU)
    from_ckpt = get_task(ckpt.task).evaluate(ckpt.build_model(), images, labels, device=CPU)
    assert from_export == pytest.approx(from_ckpt, abs=1e-6)
    # a plain checkpoint still loads through the same function
    meta2, _ = load_model_file(result.torchscript.parent.parent / "final_model.pt")
    assert meta2.model == "cnn" and meta2.state_dict
    assert load_exported(result.torchscript.parent.parent / "final_model.pt") is None


def test_export_refuses_and_keeps_nothing_above_the_tolerance(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    raw = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    wrong = CheckBatch("mis-normalised", raw, to_model_images(raw) * 0.5)  # not x / 255
    with pytest.raises(ExportError, match="tolerance=1e-05"):
        export_model(ckpt, tmp_path / "out", checks=[wrong], card=CARD)
    assert list((tmp_path / "out").iterdir()) == []


def test_marker_is_the_card_inside_the_archive(exported):
    _, _, result = exported
    extra = {CARD_FILE: ""}
    torch.jit.load(str(result.torchscript), _extra_files=extra)
    assert json.loads(extra[CARD_FILE])["format"] == "medfed-model-card"


@pytest.mark.slow  # ~10 s of torch.export warm-up on 2 CPU cores: `make test-slow`
@pytest.mark.skipif(
    not onnx_available() or importlib.util.find_spec("onnxruntime") is None,
    reason="ONNX export needs the optional extra medfed[export]",
)
def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path, pneumonia_npz):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    data = load_split(ckpt, pneumonia_npz, "val")
    result = export_model(
        ckpt,
        tmp_path / "out",
        checks=check_batches(ckpt, data, n=8),
        card=CARD,
        onnx_input="uint8",
    )
    assert result.onnx is not None and result.onnx.is_file()
    assert not (tmp_path / "out" / "model.onnx.data").exists()  # one self-contained file
    onnx_diffs = {k: v for k, v in result.diffs.items() if k.startswith("onnx")}
    assert set(onnx_diffs) == {"onnx / synthetic uint8", f"onnx / {data.source}"}
    assert all(v is not None and v <= 1e-5 for v in onnx_diffs.values())
    assert result.card["files"]["onnx-input"] == "uint8"
