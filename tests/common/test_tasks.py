import numpy as np
import pytest
import torch
from torch import nn

from common.config import TASKS, RunConfig
from common.errors import ConfigError, DataError
from common.evaluation import evaluate_segmentation
from common.metrics import segmentation_metrics
from common.site_dataset import SiteDataset, SplitArrays, write_site_dataset
from common.tasks import DiceCELoss, get_task, list_tasks


def test_config_task_names_are_the_registered_tasks():
    assert set(TASKS) == set(list_tasks())


def test_unknown_task_suggests_closest_name():
    with pytest.raises(ConfigError, match="Did you mean 'segmentation'"):
        get_task("segmentaton")


def test_segmentation_metrics_by_hand():
    # Prepare: one 2 x 2 image; TP=1 (top-left), FP=1 (bottom-left), FN=1 (top-right)
    true = np.array([[[1, 1], [0, 0]]])
    pred = np.array([[[1, 0], [1, 0]]])
    # Execute
    m = segmentation_metrics(true, pred, num_classes=2)
    # Assert: Dice = 2*1 / (2*1 + 1 + 1); 2 of 4 pixels right
    assert m["dice"] == pytest.approx(0.5)
    assert m["pixel-accuracy"] == pytest.approx(0.5)
    assert m["num-examples"] == 1.0


def test_segmentation_metrics_pool_pixels_over_images():
    # image 1: perfect (TP=2); image 2: all wrong (FP=1, FN=1) -> pooled 4 / (4 + 2)
    true = np.array([[[1, 1]], [[1, 0]]])
    pred = np.array([[[1, 1]], [[0, 1]]])
    assert segmentation_metrics(true, pred, num_classes=2)["dice"] == pytest.approx(4 / 6)


def test_dice_is_nan_when_no_foreground_anywhere():
    zeros = np.zeros((1, 2, 2), dtype=np.int64)
    assert np.isnan(segmentation_metrics(zeros, zeros, num_classes=2)["dice"])


def test_dice_ce_loss_is_batch_mean_of_per_image_losses():
    # Prepare: DP-SGD clips per-sample gradients of L = mean_i l_i; check separability
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8)
    masks = torch.randint(0, 2, (3, 8, 8))
    loss = get_task("segmentation").make_loss()
    # Execute
    batch = loss(logits, masks)
    singles = torch.stack([loss(logits[i : i + 1], masks[i : i + 1]) for i in range(3)])
    # Assert
    assert isinstance(loss, DiceCELoss)
    assert batch.item() == pytest.approx(singles.mean().item(), rel=1e-5)


def test_classification_loss_is_cross_entropy():
    logits = torch.tensor([[0.0, 0.0]])
    loss = get_task("classification").make_loss()(logits, torch.tensor([1]))
    assert loss.item() == pytest.approx(np.log(2.0))


class _Threshold(nn.Module):
    """Logit of 'vessel' = 10 * (x - 0.5): predicts vessel where the pixel > 0.5."""

    def forward(self, x):
        v = 10 * (x[:, :1] - 0.5)
        return torch.cat([-v, v], dim=1)


def test_evaluate_segmentation_counts_do_not_depend_on_batch_size():
    rng = np.random.default_rng(0)
    images = rng.random((5, 1, 4, 4)).astype(np.float32)
    masks = (rng.random((5, 4, 4)) > 0.6).astype(np.int64)
    kw = {"device": torch.device("cpu"), "loss": DiceCELoss()}
    a = evaluate_segmentation(_Threshold(), images, masks, batch_size=2, **kw)
    b = evaluate_segmentation(_Threshold(), images, masks, batch_size=5, **kw)
    expected = segmentation_metrics(masks, (images[:, 0] > 0.5).astype(np.int64), num_classes=2)
    assert a["dice"] == pytest.approx(expected["dice"])
    assert a["dice"] == pytest.approx(b["dice"])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["num-examples"] == 5.0


def test_the_registered_task_scores_with_its_own_metrics():
    images = np.zeros((2, 1, 4, 4), dtype=np.float32)
    masks = np.zeros((2, 4, 4), dtype=np.int64)
    m = get_task("segmentation").evaluate(_Threshold(), images, masks, device=torch.device("cpu"))
    assert m["pixel-accuracy"] == 1.0 and "auroc" not in m


def _seg_dataset(path, size):
    images = np.zeros((2, 1, size, size), dtype=np.float32)
    masks = np.zeros((2, size, size), dtype=np.int64)
    masks[0, 0, :3] = 1
    write_site_dataset(
        path,
        task="segmentation",
        label_names=["background", "vessel"],
        splits={"train": SplitArrays.create(images, masks)},
        preprocessing={},
        provenance={},
    )
    return SiteDataset(path)


def test_segmentation_masks_are_stored_and_counted_per_pixel(tmp_path):
    data = _seg_dataset(tmp_path / "s", 16)
    split = data.manifest["splits"]["train"]
    assert split["label_counts"] == {"background": 2 * 256 - 3, "vessel": 3}
    assert split["label_unit"] == "pixels"
    assert data.load("train").labels.shape == (2, 16, 16)


def test_masks_must_match_image_size():
    with pytest.raises(DataError, match="masks must be"):
        SplitArrays.create(np.zeros((1, 1, 4, 4)), np.zeros((1, 4, 5)))


def test_segmentation_check_accepts_any_multiple_of_16_and_rejects_others(tmp_path):
    task = get_task("segmentation")
    task.check_dataset(_seg_dataset(tmp_path / "a", 48), model="unet", num_classes=2)
    with pytest.raises(DataError, match="divisible by 16"):
        task.check_dataset(_seg_dataset(tmp_path / "b", 24), model="unet", num_classes=2)
    with pytest.raises(DataError, match="does not match"):
        get_task("classification").check_dataset(
            _seg_dataset(tmp_path / "c", 16), model="cnn", num_classes=2
        )


def test_amp_is_refused_under_dp():
    with pytest.raises(ConfigError, match="amp"):
        RunConfig.from_run_config({"amp": True})
    assert RunConfig.from_run_config({"amp": True, "dp.enabled": False}).train.amp
