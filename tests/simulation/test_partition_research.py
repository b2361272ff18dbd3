"""Quantity-skew and natural partitioners (simulation/data/partition.py)."""

import numpy as np
import pytest

from common.errors import ConfigError
from simulation.data.partition import natural_partition, quantity_skew_partition


def test_quantity_skew_covers_all_disjoint_with_floor_and_is_seeded():
    labels = np.zeros(100, dtype=np.int64)
    parts = quantity_skew_partition(labels, 4, alpha=0.5, seed=7, min_size=5)
    again = quantity_skew_partition(labels, 4, alpha=0.5, seed=7, min_size=5)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(100))
    assert all(p.size >= 5 for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_quantity_skew_small_alpha_is_more_unequal_than_large_alpha():
    labels = np.zeros(1000, dtype=np.int64)
    spread = {
        a: np.std([p.size for p in quantity_skew_partition(labels, 5, alpha=a, seed=1)])
        for a in (0.1, 100.0)
    }
    assert spread[0.1] > 3 * spread[100.0]


def test_quantity_skew_rejects_bad_alpha_and_too_large_floor():
    with pytest.raises(ConfigError, match="alpha"):
        quantity_skew_partition(np.zeros(10), 2, alpha=0.0, seed=0)
    with pytest.raises(ConfigError, match="min_size"):
        quantity_skew_partition(np.zeros(10), 3, alpha=1.0, seed=0, min_size=4)


def test_natural_partition_groups_by_site_column():
    sites = np.array(["b", "a", "b", "c", "a"])
    names, parts = natural_partition(sites)
    assert names == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]


def test_natural_partition_rejects_empty_column():
    with pytest.raises(ConfigError, match="empty"):
        natural_partition(np.array([]))
