"""Tiny, seeded classification site datasets for tests (the site-dataset contract)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.site_dataset import SplitArrays, write_site_dataset


def tiny_site(path: Path, *, train: int = 30, val: int = 10, seed: int = 0) -> Path:
    """Write a 28 x 28 two-class site dataset at ``path`` (random images) and return it.

    Parameters
    ----------
    path : Path
        Target directory (must not exist).
    train, val : int
        Images in the ``train`` and ``val`` splits.
    seed : int
        Seed of the images and labels.
    """
    rng = np.random.default_rng(seed)
    n = train + val
    labels = rng.integers(0, 2, n)
    images = rng.random((n, 1, 28, 28)).astype(np.float32)
    write_site_dataset(
        path,
        task="classification",
        label_names=["normal", "pneumonia"],
        splits={
            "train": SplitArrays.create(images[:train], labels[:train]),
            "val": SplitArrays.create(images[train:], labels[train:]),
        },
        preprocessing={},
        provenance={},
    )
    return path
