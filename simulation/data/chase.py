"""CHASE_DB1 retinal vessel segmentation as virtual hospitals, split by child.

CHASE_DB1 (Fraz et al., IEEE Trans. Biomed. Eng. 59(9), 2012): fundus photographs of
both eyes of school children (``Image_NNL.jpg`` / ``Image_NNR.jpg``, 999 x 960 RGB) with
two human vessel annotations (``Image_NNX_1stHO.png``, ``Image_NNX_2ndHO.png``). The
copy in ``../shared/data/chase_db1`` holds children 01-11 (22 images).

Preprocessing (recorded in every site manifest): the green channel (best vessel contrast
in fundus photographs), box-filter resized to ``size x size`` (the 999 x 960 aspect is
not kept; 4 % stretch) and scaled to ``[0, 1]``; masks box-filtered to the same size and
thresholded at 0.5 (vessel = 1). At 128 px this keeps the vessel fraction (6.3 % vs
7.0 % at full size) and the inter-observer Dice (0.82 vs 0.82 for child 01L).

Split: children are the unit (both eyes of a child stay together). A seeded permutation
puts ``val_children`` children into the held-out ``global-val`` site dataset (whole
images, for the coordinator's evaluation); the others are dealt round-robin to the
sites. Each site keeps its last child as local ``val`` (non-overlapping tiles) and trains
on overlapping ``patch x patch`` patches (stride ``patch // 2``) of the others.

Privacy unit: DP-SGD at a site treats each *patch* as a record; patches of one child
overlap and are correlated, so the reported epsilon is patch-level, not child-level
(the ``groups`` arrays carry the child for a future group-level accountant).

The first observer's mask is the ground truth; :func:`inter_observer_metrics` scores the
second observer against it on the same children (the human reference for a model's Dice).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, DataError, DataNotFoundError
from common.metrics import segmentation_metrics
from common.site_dataset import SplitArrays, write_site_dataset
from simulation.data.sites import GLOBAL_EVAL

log = logging.getLogger(__name__)

DATASET = "chase_db1"
LABEL_NAMES = ("background", "vessel")
_IMAGE_RE = re.compile(r"^Image_(\d{2})([LR])\.jpg$")


@dataclass(frozen=True)
class ChaseImages:
    """Preprocessed CHASE_DB1 images of some children.

    Attributes
    ----------
    images : numpy.ndarray
        float32 ``(N, 1, S, S)`` green channel in ``[0, 1]``.
    masks : numpy.ndarray
        int64 ``(N, S, S)`` first observer's vessel mask (0/1).
    masks_2nd : numpy.ndarray
        int64 ``(N, S, S)`` second observer's vessel mask (0/1).
    children : numpy.ndarray
        int64 ``(N,)`` child number (``NN`` of the file name).
    names : tuple[str, ...]
        ``NNX`` per image (e.g. ``01L``); file names of a public set, no PHI.

    """

    images: np.ndarray
    masks: np.ndarray
    masks_2nd: np.ndarray
    children: np.ndarray
    names: tuple[str, ...]

    def select(self, children: Sequence[int]) -> ChaseImages:
        """Return the images of ``children`` (in file order)."""
        keep = np.isin(self.children, np.asarray(children, dtype=np.int64))
        return ChaseImages(
            self.images[keep],
            self.masks[keep],
            self.masks_2nd[keep],
            self.children[keep],
            tuple(n for n, k in zip(self.names, keep, strict=True) if k),
        )


def chase_dir(data_dir: Path) -> Path:
    """``<data_dir>/chase_db1`` (or ``data_dir`` itself if it holds the files).

    Raises
    ------
    DataNotFoundError
        If no ``Image_NNX.jpg`` file is there.

    """
    for candidate in (data_dir / DATASET, data_dir):
        if candidate.is_dir() and any(_IMAGE_RE.match(p.name) for p in candidate.iterdir()):
            return candidate
    raise DataNotFoundError(
        f"no CHASE_DB1 images (Image_NNX.jpg) under {data_dir} or {data_dir / DATASET}; "
        "pass --data-dir pointing at the folder that holds chase_db1/."
    )


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(arr)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float64)


def load_chase(data_dir: Path, *, size: int = 128) -> ChaseImages:
    """Read and preprocess every CHASE_DB1 image with both masks (see module docstring).

    Parameters
    ----------
    data_dir : pathlib.Path
        Folder with ``chase_db1/`` (or the chase folder itself).
    size : int
        Output height and width in pixels; a multiple of 16 (U-Net), >= 32.

    Returns
    -------
    ChaseImages

    Raises
    ------
    ConfigError
        Bad ``size``.
    DataNotFoundError, DataError
        Missing folder or a missing/odd mask file.

    """
    from PIL import Image

    if size < 32 or size % 16:
        raise ConfigError(f"CHASE_DB1 size={size} must be a multiple of 16 and >= 32")
    root = chase_dir(data_dir)
    files = sorted(p for p in root.iterdir() if _IMAGE_RE.match(p.name))
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    masks2: list[np.ndarray] = []
    children: list[int] = []
    names: list[str] = []
    for path in files:
        m = _IMAGE_RE.match(path.name)
        assert m is not None  # filtered above
        stem = path.name.removesuffix(".jpg")
        rgb = np.asarray(Image.open(path).convert("RGB"))
        images.append(_resize(rgb[:, :, 1], size) / 255.0)
        for observer, out in (("1stHO", masks), ("2ndHO", masks2)):
            mpath = root / f"{stem}_{observer}.png"
            if not mpath.is_file():
                raise DataError(f"CHASE_DB1 mask {mpath.name} is missing")
            binary = (np.asarray(Image.open(mpath).convert("L")) > 0).astype(np.uint8) * 255
            if binary.shape != rgb.shape[:2]:
                raise DataError(f"{mpath.name} is {binary.shape}, image is {rgb.shape[:2]}")
            out.append((_resize(binary, size) / 255.0 >= 0.5).astype(np.int64))
        children.append(int(m.group(1)))
        names.append(m.group(1) + m.group(2))
    if not files:
        raise DataNotFoundError(f"no CHASE_DB1 images in {root}")
    return ChaseImages(
        images=np.clip(np.stack(images), 0.0, 1.0).astype(np.float32)[:, None],
        masks=np.stack(masks),
        masks_2nd=np.stack(masks2),
        children=np.asarray(children, dtype=np.int64),
        names=tuple(names),
    )


def extract_patches(
    images: np.ndarray, masks: np.ndarray, groups: np.ndarray, *, patch: int, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut every image into ``patch x patch`` windows with step ``stride`` (row-major).

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, C, S, S)``.
    masks : numpy.ndarray
        ``(N, S, S)``.
    groups : numpy.ndarray
        ``(N,)``; each patch inherits its image's group.
    patch, stride : int
        Window size and step in pixels; ``(S - patch)`` must be a multiple of ``stride``.

    Returns
    -------
    tuple of numpy.ndarray
        ``(M, C, patch, patch)``, ``(M, patch, patch)``, ``(M,)`` with
        ``M = N * ((S - patch) // stride + 1) ** 2``.

    Raises
    ------
    ConfigError
        If the windows do not tile the image exactly.

    """
    size = images.shape[-1]
    if patch > size or (size - patch) % stride:
        raise ConfigError(
            f"patch={patch}, stride={stride} do not tile {size} x {size} images; choose "
            "a patch <= size with (size - patch) divisible by the stride."
        )
    starts = range(0, size - patch + 1, stride)
    xs, ys, gs = [], [], []
    for i in range(images.shape[0]):
        for r in starts:
            for c in starts:
                xs.append(images[i, :, r : r + patch, c : c + patch])
                ys.append(masks[i, r : r + patch, c : c + patch])
                gs.append(groups[i])
    return np.stack(xs), np.stack(ys), np.asarray(gs, dtype=np.int64)


@dataclass(frozen=True, kw_only=True)
class ChasePlan:
    """How CHASE_DB1 becomes sites.

    Attributes
    ----------
    num_sites : int
        Virtual hospitals (each needs >= 2 children: one trains, one validates).
    val_children : int
        Children held out for the coordinator's ``global-val`` dataset.
    size : int
        Image size after resizing (pixels, multiple of 16).
    patch : int
        Training patch size (pixels, multiple of 16); local ``val`` uses the same tiles.
    seed : int
        Seed of the child permutation.

    """

    num_sites: int = 3
    val_children: int = 2
    size: int = 128
    patch: int = 32
    seed: int = 42

    def __post_init__(self) -> None:
        if self.num_sites < 1:
            raise ConfigError(f"--sites must be >= 1, got {self.num_sites}")
        if self.val_children < 1:
            raise ConfigError(f"val_children must be >= 1, got {self.val_children}")
        if self.patch % 16 or self.patch < 16 or self.patch > self.size:
            raise ConfigError(
                f"patch={self.patch} must be a multiple of 16 and <= size={self.size}"
            )

    def assign(self, children: Sequence[int]) -> tuple[list[list[int]], list[int]]:
        """Children per site and the held-out children (seeded; see module docstring).

        Raises
        ------
        ConfigError
            If there are too few children for ``num_sites`` sites of >= 2 children.

        """
        unique = sorted(set(int(c) for c in children))
        need = 2 * self.num_sites + self.val_children
        if len(unique) < need:
            raise ConfigError(
                f"CHASE_DB1 has {len(unique)} children; {self.num_sites} sites need "
                f"{need} (2 per site + {self.val_children} held out); use fewer --sites."
            )
        order = [unique[i] for i in np.random.default_rng(self.seed).permutation(len(unique))]
        held_out = sorted(order[: self.val_children])
        rest = order[self.val_children :]
        sites = [sorted(rest[s :: self.num_sites]) for s in range(self.num_sites)]
        return sites, held_out


def _md5_of_names(names: Sequence[str]) -> str:
    return hashlib.md5(",".join(names).encode(), usedforsecurity=False).hexdigest()


def create_chase_sites(
    data_dir: Path, out_dir: Path, *, plan: ChasePlan, overwrite: bool = True
) -> list[dict[str, Any]]:
    """Write ``site-0 .. site-{N-1}`` and ``global-val`` segmentation site datasets.

    Parameters
    ----------
    data_dir : pathlib.Path
        Folder with ``chase_db1/``.
    out_dir : pathlib.Path
        Parent folder of the site datasets (``<run>/sites``).
    plan : ChasePlan
        Split and preprocessing choices.
    overwrite : bool
        Replace existing site datasets.

    Returns
    -------
    list[dict]
        The manifests of the N sites (in order).

    """
    data = load_chase(data_dir, size=plan.size)
    sites, held_out = plan.assign(data.children.tolist())
    stride = plan.patch // 2
    preprocessing = {
        "channel": "green",
        "resize": f"box filter to {plan.size} x {plan.size} (aspect not kept)",
        "scale": "uint8 / 255 -> float32 [0, 1]",
        "mask": "1stHO (first observer), box-resized, >= 0.5 -> vessel",
        "train": f"{plan.patch} x {plan.patch} patches, stride {stride}",
        "val": f"non-overlapping {plan.patch} x {plan.patch} tiles",
    }
    provenance = {
        "source": DATASET,
        "reference": "Fraz et al., IEEE TBME 59(9), 2012",
        "partitioner": "by-child",
        "num-sites": plan.num_sites,
        "seed": plan.seed,
    }
    manifests = []
    for site, kids in enumerate(sites):
        train_part, val_part = data.select(kids[:-1]), data.select(kids[-1:])
        splits = {
            "train": SplitArrays.create(
                *extract_patches(
                    train_part.images,
                    train_part.masks,
                    train_part.children,
                    patch=plan.patch,
                    stride=stride,
                )
            ),
            "val": SplitArrays.create(
                *extract_patches(
                    val_part.images,
                    val_part.masks,
                    val_part.children,
                    patch=plan.patch,
                    stride=plan.patch,
                )
            ),
        }
        manifests.append(
            write_site_dataset(
                out_dir / f"site-{site}",
                task="segmentation",
                label_names=LABEL_NAMES,
                splits=splits,
                preprocessing=preprocessing,
                provenance=provenance
                | {"site": site, "images-md5": _md5_of_names(train_part.names + val_part.names)},
                summary={"children": len(kids), "images": len(train_part.names + val_part.names)},
                overwrite=overwrite,
            )
        )
        log.info("site-%d: children %s, %d train patches", site, kids, len(splits["train"]))
    val = data.select(held_out)
    write_site_dataset(
        out_dir / GLOBAL_EVAL,
        task="segmentation",
        label_names=LABEL_NAMES,
        splits={"val": SplitArrays.create(val.images, val.masks, val.children)},
        preprocessing=preprocessing | {"val": "whole images"},
        provenance=provenance
        | {"split": "held-out children", "images-md5": _md5_of_names(val.names)},
        summary={"children": len(held_out), "images": len(val.names)},
        overwrite=overwrite,
    )
    return manifests


def inter_observer_metrics(data_dir: Path, *, plan: ChasePlan) -> dict[str, float]:
    """Second observer vs first on the held-out children of ``plan`` (human reference).

    Same preprocessing and the same pooled Dice formula as the model's evaluation
    (:func:`common.metrics.segmentation_metrics`).
    """
    data = load_chase(data_dir, size=plan.size)
    _, held_out = plan.assign(data.children.tolist())
    val = data.select(held_out)
    return segmentation_metrics(val.masks, val.masks_2nd, num_classes=len(LABEL_NAMES))
