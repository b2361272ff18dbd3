import json

import numpy as np
import pytest

from common.errors import DataError, DataNotFoundError
from common.site_dataset import SiteDataset, SplitArrays, write_site_dataset


def _split(n, label=0):
    return SplitArrays.create(np.full((n, 1, 4, 4), 0.5, np.float32), np.full(n, label))


def _write(path, **kw):
    return write_site_dataset(
        path,
        task="classification",
        label_names=["a", "b"],
        splits={"train": _split(3, 1), "val": _split(2)},
        preprocessing={"scale": "x/255"},
        provenance={"source": "test"},
        **kw,
    )


def test_round_trip_and_manifest_counts(tmp_path):
    manifest = _write(tmp_path / "s")
    ds = SiteDataset(tmp_path / "s", verify=True)
    train = ds.load("train")
    assert train.images.shape == (3, 1, 4, 4) and train.images.dtype == np.float32
    assert train.labels.tolist() == [1, 1, 1]
    assert train.groups.tolist() == [0, 1, 2]
    assert manifest["splits"]["train"]["label_counts"] == {"a": 0, "b": 3}
    assert ds.image_shape == (1, 4, 4) and ds.fingerprint == manifest["fingerprint"]


def test_existing_dataset_is_not_overwritten_without_flag(tmp_path):
    _write(tmp_path / "s")
    with pytest.raises(DataError, match="already exists"):
        _write(tmp_path / "s")
    _write(tmp_path / "s", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_tampered_array_is_detected(tmp_path):
    _write(tmp_path / "s")
    np.save(tmp_path / "s" / "train_labels.npy", np.zeros(3, np.int64))
    with pytest.raises(DataError, match="does not match its manifest hash"):
        SiteDataset(tmp_path / "s", verify=True)


def test_missing_split_and_missing_dataset_errors(tmp_path):
    _write(tmp_path / "s")
    with pytest.raises(DataError, match="no 'test' split; it has \\['train', 'val'\\]"):
        SiteDataset(tmp_path / "s").load("test")
    with pytest.raises(DataNotFoundError, match="medfed ingest"):
        SiteDataset(tmp_path / "nothing")


def test_wrong_format_version_is_refused(tmp_path):
    _write(tmp_path / "s")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="v99"):
        SiteDataset(tmp_path / "s")


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((2, 4, 4)), np.zeros(2), "N, C, H, W"),
        (np.zeros((2, 1, 4, 4)), np.zeros(3), "2 images but 3 labels"),
        (np.full((1, 1, 2, 2), 2.0), np.zeros(1), "\\[0, 1\\]"),
        # NaN passes every range comparison: refused as non-finite (issue 16, item 3)
        (np.full((1, 1, 2, 2), np.nan), np.zeros(1), "finite"),
        (np.array([[[[0.5, np.inf]]]]), np.zeros(1), "finite"),
    ],
)
def test_invalid_arrays_are_rejected(images, labels, match):
    with pytest.raises(DataError, match=match):
        SplitArrays.create(images, labels)
