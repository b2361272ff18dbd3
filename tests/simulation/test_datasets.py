import numpy as np
import pytest

from common.errors import ChecksumError, DataError, DataNotFoundError
from simulation.data import datasets
from simulation.data.datasets import (
    MedMNISTInfo,
    download_medmnist,
    load_medmnist_split,
    md5sum,
    to_model_images,
)


def test_real_file_shapes(pneumonia_npz):
    images, labels = load_medmnist_split(pneumonia_npz, "val")
    assert images.shape == (524, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (524,) and set(np.unique(labels)) == {0, 1}


def test_missing_split_names_available_ones(pneumonia_npz):
    with pytest.raises(DataError, match="no 'test' split \\(it has \\['train', 'val'\\]\\)"):
        load_medmnist_split(pneumonia_npz, "test")


def test_file_with_only_some_splits(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, val_images=np.zeros((2, 28, 28), np.uint8), val_labels=np.array([[0], [1]]))
    _, labels = load_medmnist_split(path, "val")
    assert labels.tolist() == [0, 1]
    with pytest.raises(DataError, match="has no 'train' split"):
        load_medmnist_split(path, "train")


def test_missing_file():
    with pytest.raises(DataNotFoundError):
        load_medmnist_split("/nonexistent/file.npz", "train")


def test_to_model_images_scales_exactly():
    x = to_model_images(np.array([[[0, 255]]], dtype=np.uint8))
    assert x.shape == (1, 1, 1, 2) and x.dtype == np.float32
    assert x.ravel().tolist() == [0.0, 1.0]


def test_download_verifies_checksum(tmp_path, monkeypatch, pneumonia_npz):
    # The official Zenodo URL is unreachable here; serve the real file over file://.
    url = pneumonia_npz.resolve().as_uri()
    good = MedMNISTInfo("pneumoniamnist", url, md5sum(pneumonia_npz), ("n", "p"))
    monkeypatch.setitem(datasets.MEDMNIST, "pneumoniamnist", good)
    out = download_medmnist("pneumoniamnist", tmp_path)
    assert md5sum(out) == good.md5
    bad = MedMNISTInfo("pneumoniamnist", url, "0" * 32, ("n", "p"))
    monkeypatch.setitem(datasets.MEDMNIST, "pneumoniamnist", bad)
    with pytest.raises(ChecksumError):
        download_medmnist("pneumoniamnist", tmp_path / "again")
    assert not (tmp_path / "again" / "pneumoniamnist" / "pneumoniamnist.npz").exists()
