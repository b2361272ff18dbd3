"""The site dataset: the contract between every data path and training (DESIGN section 3).

A hospital's DICOM ingestion and a researcher's partitioning of a public dataset both
write one; the ClientApp (and a coordinator's optional held-out evaluation) only ever
read one. Layout of a site dataset directory::

    manifest.json            versioned, PHI-free description (see below)
    <split>_images.npy       float32 (N, C, H, W), intensities scaled to [0, 1]
    <split>_labels.npy       int64 (N,) class indices (classification), or
                             int64 (N, H, W) per-pixel class masks (segmentation)
    <split>_groups.npy       int64 (N,) patient group of each image (DP unit, splits)

``.npy`` files are memory-mapped on read (``numpy.load(mmap_mode="r")``).

The manifest holds the task, label names, per-split counts (``label_counts`` count
images, or pixels for masks: then the split also has ``"label_unit": "pixels"``), the
preprocessing used, provenance (tool, source, content hashes), quarantined inputs with
machine-readable reasons, free-form non-identifying summary counts, the SHA-256 of every
array file and a ``fingerprint`` of the whole dataset (used to key a site's privacy
ledger). It never holds names, identifiers, dates or paths that may carry PHI: writers
pass hashes.

This module imports numpy only, so ingestion runs on a minimal install.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError, DataNotFoundError

FORMAT = "medfed-site-dataset"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitArrays:
    """The arrays of one split.

    Attributes
    ----------
    images : numpy.ndarray
        float32 ``(N, C, H, W)`` in ``[0, 1]``.
    labels : numpy.ndarray
        int64 ``(N,)`` class indices (classification), or int64 ``(N, H, W)`` masks of
        class indices per pixel (segmentation; ``H, W`` as the images').
    groups : numpy.ndarray
        int64 ``(N,)`` patient group per image; images of one patient share a group.

    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray

    @classmethod
    def create(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        groups: np.ndarray | None = None,
        *,
        unit_range: bool = True,
    ) -> SplitArrays:
        """Validate and convert arrays; ``groups`` defaults to one group per image.

        ``unit_range=False`` is for task ``tabular``: standardised features stored as
        ``(N, F, 1, 1)`` may be negative or > 1 (they must still be finite).

        Raises
        ------
        DataError
            On wrong rank, mismatched lengths, values outside ``[0, 1]`` (with
            ``unit_range``) or non-finite values (without), or negative labels.

        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if images.ndim != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {images.shape}")
        if labels.ndim == 3:  # segmentation masks, one label per pixel
            if labels.shape != (images.shape[0], *images.shape[2:]):
                raise DataError(
                    f"masks must be (N, H, W) = {(images.shape[0], *images.shape[2:])} to "
                    f"match the images, got {labels.shape}"
                )
        else:
            labels = labels.reshape(-1)
        n = images.shape[0]
        if labels.shape[0] != n:
            raise DataError(f"{n} images but {labels.shape[0]} labels")
        groups_arr = (
            np.arange(n, dtype=np.int64)
            if groups is None
            else np.ascontiguousarray(groups, dtype=np.int64).reshape(-1)
        )
        if groups_arr.shape[0] != n:
            raise DataError(f"{n} images but {groups_arr.shape[0]} group ids")
        if unit_range and n and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
            raise DataError("image intensities must be scaled to [0, 1] before writing")
        if not unit_range and n and not bool(np.isfinite(images).all()):
            raise DataError("features must be finite (impute missing values before writing)")
        if n and int(labels.min()) < 0:
            raise DataError("labels must be non-negative class indices")
        return cls(images=images, labels=labels, groups=groups_arr)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_site_dataset(
    out_dir: str | os.PathLike[str],
    *,
    task: str,
    label_names: Sequence[str],
    splits: Mapping[str, SplitArrays],
    preprocessing: Mapping[str, Any],
    provenance: Mapping[str, Any],
    quarantine: Sequence[Mapping[str, Any]] = (),
    summary: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a site dataset directory atomically.

    The directory is assembled under a temporary name next to ``out_dir`` and renamed
    into place, so a reader never sees a half-written dataset.

    Parameters
    ----------
    out_dir : path
        Target directory; must not exist unless ``overwrite``.
    task : str
        ``"classification"``.
    label_names : Sequence[str]
        Name of each class index.
    splits : Mapping[str, SplitArrays]
        Non-empty; keys from ``("train", "val", "test")``.
    preprocessing, provenance : Mapping
        JSON-serialisable, PHI-free descriptions.
    quarantine : Sequence[Mapping]
        One entry per rejected input: ``{"input": <hash>, "reason": <code>, ...}``.
    summary : Mapping, optional
        Extra non-identifying counts (e.g. by modality or manufacturer).
    overwrite : bool
        Replace an existing dataset.

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    DataError
        Unknown split names, no splits, labels outside ``label_names``, or an existing
        ``out_dir`` without ``overwrite``.

    """
    out = Path(out_dir)
    if not splits:
        raise DataError("a site dataset needs at least one split")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise DataError(f"unknown split(s) {sorted(unknown)}; use {list(SPLITS)}")
    if out.exists() and not overwrite:
        raise DataError(f"site dataset {out} already exists; pass overwrite=True / --force")
    shapes = {tuple(s.images.shape[1:]) for s in splits.values() if len(s)}
    if len(shapes) > 1:
        raise DataError(f"all splits must share one image shape, got {sorted(shapes)}")
    n_classes = len(label_names)
    for name, s in splits.items():
        if len(s) and int(s.labels.max()) >= n_classes:
            raise DataError(f"split {name!r} has label {int(s.labels.max())} >= {n_classes}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hashes: dict[str, str] = {}
        split_info: dict[str, Any] = {}
        for name, s in splits.items():
            for kind, arr in (("images", s.images), ("labels", s.labels), ("groups", s.groups)):
                fname = f"{name}_{kind}.npy"
                np.save(tmp / fname, arr, allow_pickle=False)
                hashes[fname] = _sha256_file(tmp / fname)
            counts = (
                np.bincount(s.labels.reshape(-1), minlength=n_classes)
                if len(s)
                else np.zeros(n_classes)
            )
            split_info[name] = {
                "count": len(s),
                "groups": int(np.unique(s.groups).size),
                "label_counts": {label_names[i]: int(c) for i, c in enumerate(counts)},
            }
            if s.labels.ndim == 3:
                split_info[name]["label_unit"] = "pixels"
        fingerprint = hashlib.sha256(
            json.dumps(
                {"task": task, "labels": list(label_names), "arrays": hashes}, sort_keys=True
            ).encode()
        ).hexdigest()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "task": task,
            "label_names": list(label_names),
            "image_shape": list(next(iter(shapes))) if shapes else [],
            "splits": split_info,
            "preprocessing": dict(preprocessing),
            "provenance": dict(provenance),
            "quarantine": [dict(q) for q in quarantine],
            "summary": dict(summary or {}),
            "arrays": hashes,
            "fingerprint": fingerprint,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


class SiteDataset:
    """Read-only view of a site dataset directory.

    Parameters
    ----------
    path : path
        The directory written by :func:`write_site_dataset`.
    verify : bool
        Re-hash every array file against the manifest (slower; detects tampering).

    Raises
    ------
    DataNotFoundError
        If the directory or its manifest is missing.
    DataError
        If the manifest is of another format/version or a hash does not match.

    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = False) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise DataNotFoundError(
                f"no site dataset at {self.path} ({MANIFEST} missing); create one with "
                "`medfed ingest` (hospital) or `medfed simulate` (virtual sites)."
            )
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{mpath} is not valid JSON: {exc}") from exc
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DataError(
                f"{mpath} is format {manifest.get('format')!r} v{manifest.get('version')}, "
                f"expected {FORMAT!r} v{VERSION}; re-create the site dataset."
            )
        self.manifest: dict[str, Any] = manifest
        if verify:
            for fname, digest in manifest["arrays"].items():
                if _sha256_file(self.path / fname) != digest:
                    raise DataError(f"{self.path / fname} does not match its manifest hash")

    @property
    def task(self) -> str:
        """The task, e.g. ``"classification"``."""
        return str(self.manifest["task"])

    @property
    def label_names(self) -> list[str]:
        """Class names by index."""
        return list(self.manifest["label_names"])

    @property
    def fingerprint(self) -> str:
        """SHA-256 over task, labels and array hashes (hex)."""
        return str(self.manifest["fingerprint"])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)``."""
        return tuple(int(v) for v in self.manifest["image_shape"])

    @property
    def splits(self) -> list[str]:
        """Split names present."""
        return list(self.manifest["splits"])

    def count(self, split: str) -> int:
        """Return the number of images in ``split`` (0 if absent)."""
        return int(self.manifest["splits"].get(split, {}).get("count", 0))

    def group_count(self, split: str) -> int:
        """Return the number of patients (distinct groups) in ``split`` (0 if absent)."""
        return int(self.manifest["splits"].get(split, {}).get("groups", 0))

    def load(self, split: str, *, mmap: bool = True) -> SplitArrays:
        """Return the arrays of ``split``, memory-mapped by default.

        Raises
        ------
        DataError
            If the split is absent (names the splits that exist).

        """
        if split not in self.manifest["splits"]:
            raise DataError(
                f"site dataset {self.path} has no {split!r} split; it has {self.splits}"
            )

        def arr(kind: str) -> np.ndarray:
            path = self.path / f"{split}_{kind}.npy"
            loaded: np.ndarray = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            return loaded

        return SplitArrays(images=arr("images"), labels=arr("labels"), groups=arr("groups"))
