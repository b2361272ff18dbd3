"""Tiny, seeded classification site datasets for tests (the site-dataset contract)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.site_dataset import SplitArrays, write_site_dataset


def tiny_site(
    path: Path, *, train: int = 30, val: int = 10, seed: int = 0, signal: float = 0.0
) -> Path:
    """Write a 28 x 28 two-class site dataset at ``path`` (random images) and return it.

    Parameters
    ----------
    path : Path
        Target directory (must not exist).
    train, val : int
        Images in the ``train`` and ``val`` splits.
    seed : int
        Seed of the images and labels.
    signal : float
        In ``[0, 1]``: how much brighter class-1 images are (``0``: pure noise, nothing
        to learn; ``0.5``: a CNN learns it in a few steps).
    """
    rng = np.random.default_rng(seed)
    n = train + val
    labels = rng.integers(0, 2, n)
    noise = rng.random((n, 1, 28, 28))
    images = ((1.0 - signal) * noise + signal * labels[:, None, None, None]).astype(np.float32)
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
