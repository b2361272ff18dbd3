"""Turn a public dataset into N virtual hospital site datasets (DESIGN section 3).

Each site gets its partition of the training data, split again into a local ``train``
and ``val`` part; the official validation split becomes a held-out site dataset for the
coordinator's global evaluation. Everything is written through
:func:`common.site_dataset.write_site_dataset`, the same contract DICOM ingestion uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, DataError
from common.site_dataset import SplitArrays, write_site_dataset
from simulation.data.datasets import load_medmnist_split, md5sum, to_model_images
from simulation.data.partition import dirichlet_partition, iid_partition, quantity_skew_partition

log = logging.getLogger(__name__)

PARTITIONERS = ("iid", "dirichlet", "quantity")
GLOBAL_EVAL = "global-val"


@dataclass(frozen=True, kw_only=True)
class SplitPlan:
    """How to cut the training data into sites.

    Attributes
    ----------
    num_sites : int
        Number of virtual hospitals, >= 1.
    partitioner : str
        ``"iid"`` or ``"dirichlet"``.
    alpha : float
        Dirichlet concentration (ignored for IID).
    val_fraction : float
        Share of each site's data kept for local validation, in ``[0, 0.5]``.
    seed : int
        Seed for partitioning and the local train/val split.

    """

    num_sites: int
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    val_fraction: float = 0.1
    seed: int = 42

    def __post_init__(self) -> None:
        if self.num_sites < 1:
            raise ConfigError(f"--sites must be >= 1, got {self.num_sites}")
        if self.partitioner not in PARTITIONERS:
            raise ConfigError(
                f"--partition must be one of {list(PARTITIONERS)}, got {self.partitioner!r}"
            )
        if self.partitioner in ("dirichlet", "quantity") and not self.alpha > 0:
            raise ConfigError(f"--alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.val_fraction <= 0.5:
            raise ConfigError(f"--val-fraction must be in [0, 0.5], got {self.val_fraction}")

    def partition(self, labels: np.ndarray) -> list[np.ndarray]:
        """Index arrays, one per site."""
        if self.partitioner == "iid":
            return iid_partition(labels, self.num_sites, seed=self.seed)
        if self.partitioner == "quantity":
            return quantity_skew_partition(labels, self.num_sites, alpha=self.alpha, seed=self.seed)
        return dirichlet_partition(labels, self.num_sites, alpha=self.alpha, seed=self.seed)


def _local_split(
    idx: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(idx)
    n_val = round(val_fraction * idx.size)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def create_virtual_sites(
    npz_path: Path,
    out_dir: Path,
    *,
    plan: SplitPlan,
    label_names: Sequence[str],
    dataset_name: str,
    overwrite: bool = True,
    via_dicom: Path | None = None,
) -> list[dict[str, Any]]:
    """Write ``site-0 .. site-{N-1}`` and ``global-val`` site datasets under ``out_dir``.

    With ``via_dicom``, each site goes through the hospital path instead: its images are
    written as DICOM files with a labels CSV (``simulation.data.export_dicom``) under
    ``via_dicom/site_<i>/`` and ingested (``client.data.ingest``) into ``site-<i>``, with
    a patient-level local split; the pixels are the same (``uint8 / 255``).

    Parameters
    ----------
    npz_path : pathlib.Path
        MedMNIST-format file with ``train`` (and ``val`` for the global evaluation set).
    out_dir : pathlib.Path
        Parent folder of the site datasets.
    plan : SplitPlan
        Partitioning choices.
    label_names : Sequence[str]
        Class names by index.
    dataset_name : str
        Recorded in provenance.
    overwrite : bool
        Replace existing site datasets.
    via_dicom : pathlib.Path, optional
        Work folder for the DICOM exports (hospital path); None writes arrays directly.

    Returns
    -------
    list[dict]
        The manifests of the N sites (in order).

    """
    images, labels = load_medmnist_split(npz_path, "train")
    parts = plan.partition(labels)
    rng = np.random.default_rng(plan.seed + 1)
    provenance = {
        "source": dataset_name,
        "file-md5": md5sum(npz_path),
        "partitioner": plan.partitioner,
        "alpha": plan.alpha if plan.partitioner in ("dirichlet", "quantity") else None,
        "num-sites": plan.num_sites,
        "seed": plan.seed,
    }
    preprocessing = {"scale": "uint8 / 255 -> float32 [0, 1]", "resize": None}
    manifests = []
    for site, idx in enumerate(parts):
        if via_dicom is not None:
            manifests.append(
                _site_via_dicom(
                    images[idx],
                    labels[idx],
                    via_dicom,
                    out_dir / f"site-{site}",
                    site=site,
                    plan=plan,
                    label_names=label_names,
                )
            )
            continue
        tr, va = _local_split(idx, plan.val_fraction, rng)
        splits = {
            "train": SplitArrays.create(to_model_images(images[tr]), labels[tr]),
            "val": SplitArrays.create(to_model_images(images[va]), labels[va]),
        }
        manifests.append(
            write_site_dataset(
                out_dir / f"site-{site}",
                task="classification",
                label_names=label_names,
                splits=splits,
                preprocessing=preprocessing,
                provenance=provenance | {"site": site},
                overwrite=overwrite,
            )
        )
        log.info("site-%d: %d train, %d val images", site, tr.size, va.size)
    try:
        v_images, v_labels = load_medmnist_split(npz_path, "val")
    except DataError:  # no official val split: no global evaluation
        log.warning("%s has no val split: no server-side global evaluation", npz_path.name)
    else:
        write_site_dataset(
            out_dir / GLOBAL_EVAL,
            task="classification",
            label_names=label_names,
            splits={"val": SplitArrays.create(to_model_images(v_images), v_labels)},
            preprocessing=preprocessing,
            provenance=provenance | {"split": "official val"},
            overwrite=overwrite,
        )
    return manifests


def _site_via_dicom(
    images: np.ndarray,
    labels: np.ndarray,
    work_dir: Path,
    out: Path,
    *,
    site: int,
    plan: SplitPlan,
    label_names: Sequence[str],
) -> dict[str, Any]:
    """Export one site's images as DICOM and ingest them back (the hospital path)."""
    from client.data.ingest import IngestOptions, ingest
    from simulation.data.export_dicom import SITE_MANUFACTURERS, export_site_dicom

    exported = export_site_dicom(
        images,
        labels,
        work_dir / f"site_{site}",
        manufacturer=SITE_MANUFACTURERS[site % len(SITE_MANUFACTURERS)],
        seed=plan.seed,
        site=site,
        overwrite=True,
    )
    report = ingest(
        exported.dicom_dir,
        exported.labels_csv,
        out,
        options=IngestOptions(
            val_fraction=plan.val_fraction,
            seed=plan.seed + site,
            label_names=label_names,
            cache_dir=work_dir / f"site_{site}" / "cache",
            overwrite=True,
        ),
    )
    log.info(
        "site-%d via DICOM: %d files ingested, %d quarantined",
        site,
        report.ingested,
        report.quarantined,
    )
    return report.manifest
