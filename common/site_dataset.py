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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError, DataNotFoundError
from common.fsutil import (
    check_disjoint,
    check_replaceable,
    create_private,
    sha256_file,
    write_dir_atomically,
)

FORMAT = "medfed-site-dataset"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
_ARRAY_FILE = re.compile(r"^(train|val|test)_(images|labels|groups)\.npy$")
_WHAT = "site dataset"


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
            On wrong rank, mismatched lengths, non-finite values, values outside
            ``[0, 1]`` (with ``unit_range``), or negative labels.

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
        # Finite first: NaN compares False with every bound, so a range check alone
        # would let an all-NaN image through (issue 16, item 3).
        if n and not bool(np.isfinite(images).all()):
            raise DataError(
                "images must be finite: re-ingest (ingest quarantines non-finite images) "
                if unit_range
                else "features must be finite (impute missing values before writing)"
            )
        if unit_range and n and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
            raise DataError("image intensities must be scaled to [0, 1] before writing")
        if n and int(labels.min()) < 0:
            raise DataError("labels must be non-negative class indices")
        return cls(images=images, labels=labels, groups=groups_arr)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _save_array(path: Path, arr: np.ndarray) -> None:
    """Write one ``.npy`` file, created ``0600`` whatever the umask."""
    with create_private(path) as fh:
        np.save(fh, arr, allow_pickle=False)


def why_not_site_dataset(path: str | os.PathLike[str]) -> str | None:
    """Return ``None`` when ``path`` is provably a site dataset medfed wrote, else why not.

    The proof is medfed's own format-tagged file: a ``manifest.json`` whose ``format``
    is :data:`FORMAT` with the keys every version has written (``version``, ``splits``,
    ``arrays`` naming ``<split>_<kind>.npy`` files, ``fingerprint``), and a directory that
    holds nothing but that manifest and the array files it lists. Anything else in it
    (a labels file, a DICOM folder, a user's notes) means medfed did not write all of
    it, so it is not replaced. An empty directory holds nothing to lose.

    Parameters
    ----------
    path : path
        The directory to check.

    Returns
    -------
    str or None
        The reason, for an error message (no file names: they may carry PHI).

    """
    d = Path(path)
    if d.is_symlink():
        return "it is a symbolic link"
    if not d.is_dir():
        return "it is not a directory"
    names = {e.name for e in d.iterdir()}
    if not names:
        return None
    not_ours = f"it is not a {_WHAT} written by medfed (no medfed {MANIFEST})"
    if MANIFEST not in names or (d / MANIFEST).is_symlink():
        return not_ours
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return not_ours
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return not_ours
    arrays = manifest.get("arrays")
    if (
        not isinstance(manifest.get("version"), int)
        or not isinstance(manifest.get("splits"), dict)
        or not isinstance(manifest.get("fingerprint"), str)
        or not isinstance(arrays, dict)
        or not all(isinstance(k, str) and _ARRAY_FILE.match(k) for k in arrays)
    ):
        return not_ours
    foreign = names - {MANIFEST, *arrays}
    if foreign:
        n = len(foreign)
        return (
            f"it holds {n} {'entry' if n == 1 else 'entries'} besides the {_WHAT} medfed "
            "wrote (move them out first if the rest should be replaced)"
        )
    return None


def check_output_dir(
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """Fail early unless a site dataset may be written to ``out_dir``.

    ``out_dir`` may be absent, an empty directory, or (with ``overwrite``) a site
    dataset medfed wrote (:func:`why_not_site_dataset`); it must neither be, contain nor
    lie inside any of ``inputs``.

    Parameters
    ----------
    out_dir : path
        The target directory.
    overwrite : bool
        Replace an existing site dataset (``--force``).
    inputs : Mapping[str, path or None], optional
        The command's inputs by what they are called in messages, e.g.
        ``{"DICOM export": ..., "labels file": ...}``.

    Raises
    ------
    UnsafeOutputError
        If ``out_dir`` overlaps an input, exists without ``overwrite``, or is not a
        site dataset medfed wrote. Nothing is deleted.

    """
    check_disjoint(out_dir, inputs or {})
    check_replaceable(out_dir, overwrite=overwrite, why_not_ours=why_not_site_dataset, what=_WHAT)


def _check_splits(
    splits: Mapping[str, SplitArrays], label_names: Sequence[str]
) -> set[tuple[int, ...]]:
    """Return the image shapes of the non-empty splits; raise DataError on a bad split."""
    if not splits:
        raise DataError("a site dataset needs at least one split")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise DataError(f"unknown split(s) {sorted(unknown)}; use {list(SPLITS)}")
    shapes = {tuple(s.images.shape[1:]) for s in splits.values() if len(s)}
    if len(shapes) > 1:
        raise DataError(f"all splits must share one image shape, got {sorted(shapes)}")
    n_classes = len(label_names)
    for name, s in splits.items():
        if len(s) and int(s.labels.max()) >= n_classes:
            raise DataError(f"split {name!r} has label {int(s.labels.max())} >= {n_classes}")
    return shapes


def _save_split(tmp: Path, name: str, s: SplitArrays) -> dict[str, str]:
    """Save a split's arrays under ``tmp``; return ``{file name: sha256}``."""
    hashes: dict[str, str] = {}
    for kind, arr in (("images", s.images), ("labels", s.labels), ("groups", s.groups)):
        fname = f"{name}_{kind}.npy"
        _save_array(tmp / fname, arr)
        hashes[fname] = sha256_file(tmp / fname)
    return hashes


def _split_info(s: SplitArrays, label_names: Sequence[str]) -> dict[str, Any]:
    """Return a split's manifest entry: counts of images, groups and each label."""
    n_classes = len(label_names)
    counts = (
        np.bincount(s.labels.reshape(-1), minlength=n_classes) if len(s) else np.zeros(n_classes)
    )
    info: dict[str, Any] = {
        "count": len(s),
        "groups": int(np.unique(s.groups).size),
        "label_counts": {label_names[i]: int(c) for i, c in enumerate(counts)},
    }
    if s.labels.ndim == 3:
        info["label_unit"] = "pixels"
    return info


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
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> dict[str, Any]:
    """Write a site dataset directory atomically, private (``0700`` / ``0600``).

    The directory is assembled under a temporary name next to ``out_dir`` and swapped
    into place (:func:`common.fsutil.write_dir_atomically`), so a reader never sees a
    half-written dataset and a failure at any step leaves an existing one intact. An
    existing ``out_dir`` is replaced only with ``overwrite`` and only when it is a site
    dataset medfed wrote (:func:`why_not_site_dataset`). Files are created ``0600`` and
    the directory ``0700`` whatever the umask: they hold patient images.

    Parameters
    ----------
    out_dir : path
        Target directory; must not exist (or be empty) unless ``overwrite``.
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
        Replace an existing site dataset medfed wrote.
    inputs : Mapping[str, path or None], optional
        Inputs ``out_dir`` must neither be, contain nor lie inside
        (see :func:`check_output_dir`).

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    DataError
        Unknown split names, no splits, or labels outside ``label_names``.
    UnsafeOutputError
        (a ``DataError``) An existing ``out_dir`` without ``overwrite``, one that is not
        a site dataset medfed wrote, or one that overlaps ``inputs``; nothing is deleted.

    """
    out = Path(out_dir)
    shapes = _check_splits(splits, label_names)
    check_output_dir(out, overwrite=overwrite, inputs=inputs)

    def fill(tmp: Path) -> dict[str, Any]:
        hashes: dict[str, str] = {}
        split_info: dict[str, Any] = {}
        for name, s in splits.items():
            hashes.update(_save_split(tmp, name, s))
            split_info[name] = _split_info(s, label_names)
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
        with create_private(tmp / MANIFEST) as fh:
            fh.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        return manifest

    return write_dir_atomically(
        out, fill, overwrite=overwrite, why_not_ours=why_not_site_dataset, what=_WHAT
    )


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
                if sha256_file(self.path / fname) != digest:
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
