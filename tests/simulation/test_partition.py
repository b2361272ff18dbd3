import numpy as np
import pytest

from common.errors import ConfigError
from simulation.data.partition import dirichlet_partition, iid_partition

LABELS = np.array([0] * 300 + [1] * 700)


def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(n))  # disjoint and complete


def test_iid_is_complete_balanced_and_seeded():
    parts = iid_partition(LABELS, 3, seed=1)
    _check_cover(parts, LABELS.size)
    assert sorted(len(p) for p in parts) == [333, 333, 334]
    assert all(
        np.array_equal(a, b) for a, b in zip(parts, iid_partition(LABELS, 3, seed=1), strict=True)
    )
    assert not all(
        np.array_equal(a, b) for a, b in zip(parts, iid_partition(LABELS, 3, seed=2), strict=True)
    )


def _skew(parts):
    """Mean absolute deviation of site positive-rate from the global rate."""
    return np.mean([abs(LABELS[p].mean() - LABELS.mean()) for p in parts])


def test_dirichlet_is_complete_and_smaller_alpha_is_more_skewed():
    strong = [_skew(dirichlet_partition(LABELS, 5, alpha=0.1, seed=s)) for s in range(5)]
    mild = [_skew(dirichlet_partition(LABELS, 5, alpha=100.0, seed=s)) for s in range(5)]
    _check_cover(dirichlet_partition(LABELS, 5, alpha=0.5, seed=0), LABELS.size)
    assert np.mean(strong) > 3 * np.mean(mild)
    assert min(len(p) for p in dirichlet_partition(LABELS, 5, alpha=0.1, seed=0)) >= 10


@pytest.mark.parametrize("sites", [0, -1, 2000])
def test_invalid_site_counts_fail(sites):
    with pytest.raises(ConfigError):
        iid_partition(LABELS, sites, seed=0)


def test_non_positive_alpha_fails():
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_partition(LABELS, 3, alpha=0.0, seed=0)
