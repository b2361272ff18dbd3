import numpy as np
import pytest

from common.errors import ConfigError
from common.site_dataset import SiteDataset
from simulation.data.chase import (
    ChasePlan,
    create_chase_sites,
    extract_patches,
    inter_observer_metrics,
    load_chase,
)


def test_extract_patches_by_hand():
    # Prepare: a 4 x 4 image numbered 0..15, 2 x 2 patches with stride 2 -> 4 tiles
    images = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    masks = (images[:, 0] > 7).astype(np.int64)
    # Execute
    x, y, g = extract_patches(images, masks, np.array([7]), patch=2, stride=2)
    # Assert
    assert x.shape == (4, 1, 2, 2) and y.shape == (4, 2, 2)
    np.testing.assert_array_equal(x[1, 0], [[2, 3], [6, 7]])
    np.testing.assert_array_equal(y[3], [[1, 1], [1, 1]])
    np.testing.assert_array_equal(g, [7, 7, 7, 7])


def test_extract_patches_rejects_windows_that_do_not_tile():
    with pytest.raises(ConfigError, match="do not tile"):
        extract_patches(np.zeros((1, 1, 5, 5)), np.zeros((1, 5, 5)), np.zeros(1), patch=2, stride=2)


def test_plan_keeps_children_together_and_holds_some_out():
    sites, held = ChasePlan(num_sites=3, val_children=2, seed=1).assign(range(1, 12))
    everyone = [c for s in sites for c in s] + held
    assert sorted(everyone) == list(range(1, 12))  # each child exactly once
    assert len(held) == 2 and all(len(s) >= 3 for s in sites)
    with pytest.raises(ConfigError, match="fewer --sites"):
        ChasePlan(num_sites=5).assign(range(1, 12))


def test_real_chase_images_and_masks(shared_data_dir):
    data = load_chase(shared_data_dir, size=64)
    assert data.images.shape == (22, 1, 64, 64) and data.images.dtype == np.float32
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert set(np.unique(data.masks)) == {0, 1}
    assert sorted(set(data.children.tolist())) == list(range(1, 12))
    assert 0.02 < data.masks.mean() < 0.15  # vessels are a small share of the pixels


def test_real_chase_sites_split_by_child(shared_data_dir, tmp_path):
    # Prepare
    plan = ChasePlan(num_sites=2, size=64, patch=32, seed=3)
    # Execute
    manifests = create_chase_sites(shared_data_dir, tmp_path, plan=plan)
    # Assert: disjoint children; patches (stride 16) for train, tiles for val
    seen: list[set[int]] = []
    for i, m in enumerate(manifests):
        ds = SiteDataset(tmp_path / f"site-{i}")
        train, val = ds.load("train"), ds.load("val")
        assert ds.task == "segmentation" and ds.image_shape == (1, 32, 32)
        assert train.labels.shape[1:] == (32, 32)
        assert len(train) == 9 * 2 * len(np.unique(train.groups))  # 3 x 3 patches, 2 eyes
        assert len(val) == 4 * 2  # one child, 2 x 2 tiles per eye
        assert m["splits"]["train"]["label_unit"] == "pixels"
        seen.append(set(train.groups.tolist()) | set(val.groups.tolist()))
    held = SiteDataset(tmp_path / "global-val").load("val")
    assert held.images.shape[1:] == (1, 64, 64)
    seen.append(set(held.groups.tolist()))
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 11


def test_inter_observer_dice_is_high_but_not_perfect(shared_data_dir):
    m = inter_observer_metrics(shared_data_dir, plan=ChasePlan(num_sites=2, size=64))
    assert 0.6 < m["dice"] < 0.95


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "unet", "--sites", "5"], "use fewer --sites"),
        (["--model", "unet", "--task", "classification", "--sites", "2"], "does not match"),
        (["--task", "segmentaton"], "Did you mean 'segmentation'"),
        (["--gpus-per-site", "0.5"], "CUDA is not available"),
    ],
)
def test_simulate_refuses_bad_segmentation_setups(args, message, tmp_path, shared_data_dir):
    # --model unet alone picks task segmentation and dataset chase_db1 (see simulate)
    import torch
    from typer.testing import CliRunner

    from common import cli

    if "--gpus-per-site" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    cli._register_plugins()
    result = CliRunner().invoke(
        cli.app,
        ["simulate", *args, "--rounds", "1", "--run-dir", str(tmp_path / "r"),
         "--data-dir", str(shared_data_dir)],
    )  # fmt: skip
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())


def _tiny_site(path, value, n):
    from common.site_dataset import SplitArrays, write_site_dataset

    images = np.full((n, 1, 16, 16), value, dtype=np.float32)
    masks = (images[:, 0] > 0.5).astype(np.int64)
    split = SplitArrays.create(images, masks)
    write_site_dataset(
        path, task="segmentation", label_names=["background", "vessel"],
        splits={"train": split, "val": split}, preprocessing={}, provenance={},
    )  # fmt: skip


def test_pooled_baseline_trains_on_the_union_of_the_sites(tmp_path):
    import torch

    from common.config import RunConfig
    from simulation.research.pooled import pool_splits, train_pooled

    # Prepare: site A has 2 dark images, site B 3 bright ones; B doubles as eval set
    _tiny_site(tmp_path / "a", 0.2, 2)
    _tiny_site(tmp_path / "b", 0.8, 3)
    run = RunConfig.from_run_config(
        {"task": "segmentation", "model": "unet", "num-server-rounds": 2, "local-epochs": 1,
         "batch-size": 4, "dp.enabled": False}
    )  # fmt: skip
    # Execute
    pooled = pool_splits([tmp_path / "a", tmp_path / "b"])
    result = train_pooled(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "b", run=run, device=torch.device("cpu")
    )
    # Assert: 5 images, rounds x local epochs = 2 epochs, metrics of the task
    assert len(pooled) == 5 and pooled.labels.sum() == 3 * 256
    assert result.train_examples == 5 and result.epochs == 2
    assert 0.0 <= result.metrics["pixel-accuracy"] <= 1.0 and "dice" in result.metrics
