"""Fed-Heart-Disease: the UCI Heart Disease data of 4 real hospitals as site datasets.

The natural-split benchmark of medfed, set up as FLamby's Fed-Heart-Disease (Ogier du
Terrail et al., NeurIPS 2022 Datasets & Benchmarks; ``owkin/FLamby``,
``flamby/datasets/fed_heart_disease/dataset.py`` and ``common.py``):

* centres (site ids) 0 cleveland, 1 hungarian, 2 switzerland, 3 va;
* columns 10-12 (slope, ca, thal) dropped, then every record with a missing value
  (``?``, or ``-9`` in the re-processed Hungarian file) dropped: 303 + 261 + 46 + 130 = 740
  records expected (FLamby: train/test 199/104, 172/89, 30/16, 85/45);
* binary target: column 14 > 0 (any heart disease);
* one-hot ("dummy") encoding of chest pain type (column 3, values 1-4) and resting ECG
  (column 7, values 0-2) with the first level dropped: 8 numeric + 3 + 2 = 13 features in
  pandas ``get_dummies`` order;
* per-centre train/test split: ``sklearn.model_selection.train_test_split`` of the
  centre's records with ``train_size=0.66``, ``random_state=43``, stratified by the binary
  label when both classes have > 2 records;
* z-normalisation with the mean and (unbiased) standard deviation of the centre's *train*
  part, ``(x - mean) / (std + 1e-9)``; for the pooled baseline, with the statistics of
  the pooled train parts (FLamby's ``pooled=True``). Test parts always use their centre's
  statistics (FLamby evaluates every model on the per-centre test sets).

Differences from FLamby: the shared copy of the Hungarian data is UCI's
``reprocessed.hungarian.data`` (space separated, ``-9`` = missing) instead of
``processed.hungarian.data``; :func:`load_heart` reports the counts so a mismatch shows.

Site-dataset contract: task ``tabular``; features float32 ``(N, 13, 1, 1)``; labels
int64 ``(N,)`` (0 = no disease, 1 = disease); the FLamby test part is the ``val`` split
(what the ClientApp evaluates on).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from common.errors import DataError, DataNotFoundError
from common.site_dataset import SplitArrays, write_site_dataset
from simulation.data.partition import natural_partition

log = logging.getLogger(__name__)

#: FLamby's centre numbering and the files of the shared copy.
CENTRES: dict[str, str] = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "reprocessed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
LABEL_NAMES = ("no disease", "disease")
#: 0-based columns FLamby drops (slope, ca, thal): mostly missing outside Cleveland.
DROPPED = (10, 11, 12)
#: 0-based categorical columns one-hot encoded (chest pain type, resting ECG).
CATEGORICAL = (2, 6)
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43
POOLED = "pooled"


@dataclass(frozen=True)
class HeartData:
    """The raw, encoded records of all centres (before normalisation).

    Attributes
    ----------
    features : numpy.ndarray
        float64 ``(N, 13)`` encoded features.
    labels : numpy.ndarray
        int64 ``(N,)`` binary labels.
    centre : numpy.ndarray
        int64 ``(N,)`` centre id (0 cleveland .. 3 va).
    is_train : numpy.ndarray
        bool ``(N,)``: in the centre's train part.
    feature_names : list[str]
        Column names of ``features``.
    source_sha256 : dict[str, str]
        SHA-256 of each input file (provenance).

    """

    features: np.ndarray
    labels: np.ndarray
    centre: np.ndarray
    is_train: np.ndarray
    feature_names: list[str]
    source_sha256: dict[str, str]


def _read_centre(path: Path) -> np.ndarray:
    """Read one file as float64 ``(n, 14)`` records with NaN for ``?`` and ``-9``."""
    text = path.read_text()
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 14:
            raise DataError(f"{path.name}: expected 14 values per record, got {len(fields)}")
        rows.append([np.nan if f in ("?", "-9", "-9.0") else float(f) for f in fields])
    return np.asarray(rows, dtype=np.float64)


def load_heart(data_dir: Path) -> HeartData:
    """Read and encode the 4 centres with FLamby's preprocessing (module docstring).

    Parameters
    ----------
    data_dir : pathlib.Path
        Folder with the four UCI files (``../shared/data/tabular/uci_heart_disease_4sites``).

    Returns
    -------
    HeartData

    Raises
    ------
    DataNotFoundError
        If a file is missing.
    DataError
        If a record does not have 14 values.

    """
    raw, centre_ids, train_flags, hashes = [], [], [], {}
    for cid, (name, fname) in enumerate(CENTRES.items()):
        path = Path(data_dir) / fname
        if not path.is_file():
            raise DataNotFoundError(f"{path} is missing (UCI Heart Disease, centre {name})")
        hashes[fname] = hashlib.sha256(path.read_bytes()).hexdigest()
        records = _read_centre(path)
        keep = [c for c in range(14) if c not in DROPPED]
        records = records[:, keep]
        records = records[~np.isnan(records).any(axis=1)]
        y = (records[:, -1] > 0).astype(np.int64)
        nb = records.shape[0]
        levels, counts = np.unique(y, return_counts=True)
        stratify = y if levels.size > 1 and bool((counts > 2).all()) else None
        _, test_idx = train_test_split(
            np.arange(nb),
            test_size=1.0 - TRAIN_FRACTION,
            train_size=TRAIN_FRACTION,
            random_state=SPLIT_SEED,
            shuffle=True,
            stratify=stratify,
        )
        is_train = np.ones(nb, dtype=bool)
        is_train[test_idx] = False
        raw.append(records)
        centre_ids.append(np.full(nb, cid, dtype=np.int64))
        train_flags.append(is_train)
        log.info("%s: %d records (%d train)", name, nb, int(is_train.sum()))
    table = np.concatenate(raw)
    # columns after dropping 10-12: 0..9 features, 10 = target (original column 13)
    labels = (table[:, 10] > 0).astype(np.int64)
    numeric = [c for c in range(10) if c not in CATEGORICAL]
    cols = [table[:, numeric]]
    names = [f"col{c}" for c in numeric]
    for c in CATEGORICAL:  # pandas get_dummies(drop_first=True): levels sorted, first dropped
        levels = np.unique(table[:, c])
        for lev in levels[1:]:
            cols.append((table[:, c] == lev).astype(np.float64)[:, None])
            names.append(f"col{c}={lev:g}")
    return HeartData(
        features=np.concatenate(cols, axis=1),
        labels=labels,
        centre=np.concatenate(centre_ids),
        is_train=np.concatenate(train_flags),
        feature_names=names,
        source_sha256=hashes,
    )


def _standardise(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``(x - mean(ref)) / (std(ref, ddof=1) + 1e-9)`` as float32 ``(n, F, 1, 1)``."""
    mean = ref.mean(axis=0)
    std = ref.std(axis=0, ddof=1)
    z: np.ndarray = ((x - mean) / (std + 1e-9)).astype(np.float32)
    return z[:, :, None, None]


def create_heart_sites(data_dir: Path, out_dir: Path) -> list[dict[str, Any]]:
    """Write ``site-0 .. site-3`` (natural split by hospital) and ``pooled`` site datasets.

    Each ``site-i`` holds its centre's train part (``train``) and test part (``val``),
    standardised with the centre's train statistics. ``pooled`` holds all train parts
    standardised with the pooled statistics (``train``) and all test parts with their
    centre's statistics (``val``), for the centralised baseline.

    Parameters
    ----------
    data_dir : pathlib.Path
        The UCI files (see :func:`load_heart`).
    out_dir : pathlib.Path
        Parent folder of the site datasets (overwritten).

    Returns
    -------
    list[dict]
        The manifests of the 4 sites, in centre order.

    """
    data = load_heart(data_dir)
    names, parts = natural_partition(data.centre)
    centre_names = list(CENTRES)
    provenance: dict[str, Any] = {
        "source": "UCI Heart Disease (4 hospitals)",
        "files-sha256": data.source_sha256,
        "partitioner": "natural",
        "num-sites": len(names),
    }
    preprocessing = {
        "recipe": "FLamby Fed-Heart-Disease",
        "dropped-columns": list(DROPPED),
        "missing": "records with '?' / -9 dropped",
        "one-hot": [f"col{c}" for c in CATEGORICAL],
        "features": data.feature_names,
        "normalisation": "z-score with the centre's train mean/std (ddof=1) + 1e-9",
        "train-test": f"train_test_split(train_size={TRAIN_FRACTION}, random_state={SPLIT_SEED})",
    }
    manifests = []
    val_parts = {}
    for site, idx in zip(names, parts, strict=True):
        cid = int(site)
        tr = idx[data.is_train[idx]]
        te = idx[~data.is_train[idx]]
        ref = data.features[tr]
        val_parts[cid] = SplitArrays.create(
            _standardise(data.features[te], ref), data.labels[te], unit_range=False
        )
        splits = {
            "train": SplitArrays.create(
                _standardise(data.features[tr], ref), data.labels[tr], unit_range=False
            ),
            "val": val_parts[cid],
        }
        manifests.append(
            write_site_dataset(
                out_dir / f"site-{cid}",
                task="tabular",
                label_names=LABEL_NAMES,
                splits=splits,
                preprocessing=preprocessing,
                provenance=provenance | {"site": cid, "centre": centre_names[cid]},
                overwrite=True,
            )
        )
    train_all = np.flatnonzero(data.is_train)
    pooled_val = [val_parts[c] for c in sorted(val_parts)]
    write_site_dataset(
        out_dir / POOLED,
        task="tabular",
        label_names=LABEL_NAMES,
        splits={
            "train": SplitArrays.create(
                _standardise(data.features[train_all], data.features[train_all]),
                data.labels[train_all],
                unit_range=False,
            ),
            "val": SplitArrays.create(
                np.concatenate([v.images for v in pooled_val]),
                np.concatenate([v.labels for v in pooled_val]),
                unit_range=False,
            ),
        },
        preprocessing=preprocessing | {"normalisation": "train: pooled train statistics"},
        provenance=provenance | {"site": POOLED},
        overwrite=True,
    )
    return manifests
