"""Fed-Heart-Disease preprocessing (simulation/data/heart.py) on the real UCI files."""

import numpy as np
import pytest

from common.errors import DataError
from common.site_dataset import SiteDataset, SplitArrays
from simulation.data.heart import create_heart_sites, load_heart


@pytest.fixture(scope="module")
def heart_dir(shared_data_dir):
    return shared_data_dir / "tabular" / "uci_heart_disease_4sites"


def test_counts_and_splits_match_flamby(heart_dir):
    data = load_heart(heart_dir)
    # FLamby README: train/test 199/104, 172/89, 30/16, 85/45; 740 records; 13 features
    # (8 numeric + 3 chest-pain dummies + 2 resting-ECG dummies).
    assert data.features.shape == (740, 13)
    train = [int((data.is_train & (data.centre == c)).sum()) for c in range(4)]
    test = [int((~data.is_train & (data.centre == c)).sum()) for c in range(4)]
    assert train == [199, 172, 30, 85]
    assert test == [104, 89, 16, 45]
    assert set(np.unique(data.labels)) == {0, 1}


def test_site_datasets_are_tabular_and_standardised_per_centre(heart_dir, tmp_path):
    manifests = create_heart_sites(heart_dir, tmp_path)
    assert [m["splits"]["train"]["count"] for m in manifests] == [199, 172, 30, 85]
    for i in range(4):
        site = SiteDataset(tmp_path / f"site-{i}")
        assert site.task == "tabular"
        assert site.image_shape == (13, 1, 1)
        x = np.asarray(site.load("train").images)[:, :, 0, 0]
        assert x.dtype == np.float32
        # z-scored with the centre's own train statistics: mean 0 per feature
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    pooled = SiteDataset(tmp_path / "pooled")
    assert pooled.count("train") == 486
    assert pooled.count("val") == 254


def test_unit_range_check_still_applies_to_images_but_not_tabular():
    features = np.array([[[[-2.0]]], [[[3.0]]]], dtype=np.float32)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        SplitArrays.create(features, np.array([0, 1]))
    assert len(SplitArrays.create(features, np.array([0, 1]), unit_range=False)) == 2
    with pytest.raises(DataError, match="finite"):
        SplitArrays.create(features * np.nan, np.array([0, 1]), unit_range=False)
