"""Public dataset loaders: MedMNIST ``.npz`` files (PneumoniaMNIST for the main job).

Location, in order: an explicit ``data_dir`` (``--data-dir``), ``$MEDFED_DATA_DIR``,
then ``../shared/data`` next to the working directory or the project when it exists.
Users outside this environment get the official file with
:func:`download_medmnist`, which verifies the published MD5 checksum.

Source: MedMNIST v2, Yang et al., Scientific Data 10, 41 (2023),
https://doi.org/10.1038/s41597-022-01721-8; files on Zenodo record 10519652.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from common.errors import ChecksumError, DataError, DataNotFoundError
from common.fsutil import atomic_write

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class MedMNISTInfo:
    """Official download location, checksum and label names of one MedMNIST file."""

    name: str
    url: str
    md5: str
    label_names: tuple[str, ...]


MEDMNIST: dict[str, MedMNISTInfo] = {
    "pneumoniamnist": MedMNISTInfo(
        "pneumoniamnist",
        "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1",
        "28209eda62fecd6e6a2d98b1501bb15f",
        ("normal", "pneumonia"),
    ),
    "breastmnist": MedMNISTInfo(
        "breastmnist",
        "https://zenodo.org/records/10519652/files/breastmnist.npz?download=1",
        "750601b1f35ba3300ea97c75c52ff8f6",
        ("malignant", "normal-or-benign"),
    ),
}


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find the data root: argument, ``$MEDFED_DATA_DIR``, then ``../shared/data``.

    Raises
    ------
    DataNotFoundError
        When nothing is given and no default location exists.

    """
    if data_dir:
        return Path(data_dir).expanduser()
    if env := os.environ.get("MEDFED_DATA_DIR"):
        return Path(env).expanduser()
    for candidate in (
        Path.cwd().parent / "shared" / "data",
        PROJECT_ROOT.parent / "shared" / "data",
    ):
        if candidate.is_dir():
            return candidate
    raise DataNotFoundError(
        "no data directory: pass --data-dir, set MEDFED_DATA_DIR, or download the official "
        "file with `medfed download pneumoniamnist --data-dir DIR`."
    )


def medmnist_path(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of ``<data_dir>/<name>/<name>.npz`` (or ``<data_dir>/<name>.npz``).

    Raises
    ------
    DataNotFoundError
        With the locations tried and how to get the file.

    """
    root = resolve_data_dir(data_dir)
    tried = [root / name / f"{name}.npz", root / f"{name}.npz"]
    for p in tried:
        if p.is_file():
            return p
    raise DataNotFoundError(
        f"{name}.npz not found (tried {', '.join(map(str, tried))}); download it with "
        f"`medfed download {name} --data-dir {root}`."
    )


def load_medmnist_split(path: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a MedMNIST-format ``.npz``.

    Parameters
    ----------
    path : path
        File holding any subset of ``{train,val,test}_{images,labels}``.
    split : str
        ``"train"``, ``"val"`` or ``"test"``.

    Returns
    -------
    images : numpy.ndarray
        uint8 ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (colour).
    labels : numpy.ndarray
        int64 ``(N,)``.

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    DataError
        If the split is not in the file (names the splits it has) or arrays disagree.

    """
    p = Path(path)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    if not p.is_file():
        raise DataNotFoundError(f"data file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as npz:
            files = set(npz.files)
            present = [s for s in SPLITS if f"{s}_images" in files and f"{s}_labels" in files]
            if f"{split}_images" not in files or f"{split}_labels" not in files:
                raise DataError(
                    f"{p.name} has no {split!r} split (it has {present or 'no splits'}); "
                    f"choose one of {present}."
                )
            images = np.asarray(npz[f"{split}_images"])
            labels = np.asarray(npz[f"{split}_labels"]).astype(np.int64).reshape(-1)
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{p} is not a readable .npz file: {exc}") from exc
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"{p.name}: {split}_images must be uint8 (N, H, W[, 3]), got "
            f"{images.dtype} {images.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{p.name}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    return images, labels


def to_model_images(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W[, C])`` -> float32 ``(N, C, H, W)`` in ``[0, 1]`` (x / 255)."""
    x = images.astype(np.float32) / 255.0
    return x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def md5sum(path: Path) -> str:
    """MD5 of a file (hex), as published for MedMNIST (not used for security)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def download_medmnist(
    name: str, data_dir: str | os.PathLike[str], *, timeout: float = 60.0
) -> Path:
    """Download an official MedMNIST v2 file and verify its MD5.

    Returns
    -------
    pathlib.Path
        ``<data_dir>/<name>/<name>.npz``.

    Raises
    ------
    DataError
        Unknown dataset name.
    ChecksumError
        The downloaded bytes do not match the published checksum (file removed).

    """
    if name not in MEDMNIST:
        raise DataError(f"unknown dataset {name!r}; known: {sorted(MEDMNIST)}")
    info = MEDMNIST[name]
    out = Path(data_dir) / name / f"{name}.npz"
    if out.is_file() and md5sum(out) == info.md5:
        return out
    log.info("downloading %s from %s", name, info.url)

    def fetch(fh: BinaryIO) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(info.url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
        if digest.hexdigest() != info.md5:  # raising keeps the old file, drops the new one
            raise ChecksumError(
                f"{name}: MD5 {digest.hexdigest()} != published {info.md5}; download again"
            )

    atomic_write(out, fetch, mode=None)
    return out
