"""Hospitals as DICOM: write a virtual site's images as real, de-identified DICOM files.

So that a virtual site can run the full hospital path (``export-dicom -> ingest ->
train``), each image becomes one Part 10 file (PS3.10) of the Secondary Capture Image
Storage SOP class (PS3.3 A.8.1) with Modality ``CR``, Explicit VR Little Endian, 8-bit
MONOCHROME2, no Modality or VOI LUT. Ingesting such a file gives back ``uint8 / 255`` as
float32 exactly, with no resampling when the size already matches, so training on the
ingested site agrees with training on the original arrays.

Headers are synthetic and de-identified: every UID is generated (``pydicom.uid.generate_uid``,
deterministic from the seed), the Type 2 identifying attributes (PatientName,
PatientID, StudyDate, AccessionNumber, ...) are present but empty, no dates or times,
``PatientIdentityRemoved = YES`` and ``BurnedInAnnotation = NO``; ``medfed deid-check``
finds nothing in them. Each site gets its own Manufacturer so site effects show in the
ingest summary.

Layout written by :func:`export_site_dicom`::

    <out_dir>/dicom/img_00000.dcm ...
    <out_dir>/labels.csv           sop_instance_uid,label
    <out_dir>/.medfed-owner        marker: medfed wrote this export (common/fsutil.py)

The site folder is written beside its target and swapped in; an existing one is
replaced only with ``overwrite`` and only when medfed wrote it (:func:`why_not_export`).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from common.errors import ConfigError, DataError
from common.fsutil import marker_kind, write_dir_atomically, write_marker

__all__ = ["SITE_MANUFACTURERS", "ExportedSite", "export_site_dicom", "export_sites"]

log = logging.getLogger(__name__)

#: Kind in an export folder's ownership marker (:func:`common.fsutil.write_marker`).
EXPORT_KIND = "dicom-export"
_EXPORT_FILE = re.compile(r"^img_\d{5}\.dcm$")

#: Manufacturer of virtual site ``i`` (cycled); plainly fictitious names.
SITE_MANUFACTURERS: tuple[str, ...] = tuple(f"Medfed Virtual Imaging {c}" for c in "ABCDEFGH")

#: Type 2 attributes of the modules below that are present and empty (PS3.3: Patient
#: C.7.1.1, General Study C.7.2.1, General Image C.7.6.1): required, and after
#: de-identification there is nothing to put in them.
_EMPTY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PatientOrientation",
)

#: UID root of generated UIDs (pydicom's registered root; suffix = SHA-512 of the seed).
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class ExportedSite:
    """Where a site's DICOM export went.

    Attributes
    ----------
    dicom_dir : pathlib.Path
        Folder of the ``.dcm`` files (the ``DICOM_DIR`` of ``medfed ingest``).
    labels_csv : pathlib.Path
        ``sop_instance_uid,label`` CSV (the ``--labels`` of ``medfed ingest``).
    count : int
        Files written.

    """

    dicom_dir: Path
    labels_csv: Path
    count: int


def _image_dataset(
    pixels: np.ndarray,
    *,
    sop_uid: str,
    study_uid: str,
    series_uid: str,
    manufacturer: str,
    number: int,
) -> Dataset:
    rows, cols = pixels.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDFED_EXPORT"

    ds = Dataset()
    ds.file_meta = meta
    # SOP Common (C.12.1)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    for keyword in _EMPTY_TYPE2:
        setattr(ds, keyword, "")
    # Patient (C.7.1.1)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medfed export-dicom: synthetic headers, no source identifiers"
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = study_uid
    # General Series (C.7.3.1)
    ds.Modality = "CR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1)
    ds.Manufacturer = manufacturer
    ds.ConversionType = "WSD"
    # General Image (C.7.6.1)
    ds.InstanceNumber = number
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image Pixel (C.7.6.3): 8-bit unsigned greyscale, no Modality / VOI LUT
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


def why_not_export(path: Path) -> str | None:
    """Return ``None`` when ``path`` is provably a site folder this module wrote, else why not.

    Proof: medfed's ownership marker of kind :data:`EXPORT_KIND`, or, for exports from
    before the marker, a folder holding only ``labels.csv`` and a ``dicom/`` folder of
    ``img_NNNNN.dcm`` files. An empty directory holds nothing to lose.
    """
    if path.is_symlink() or not path.is_dir():
        return "it is not a directory"
    names = {e.name for e in path.iterdir()}
    if not names or marker_kind(path) == EXPORT_KIND:
        return None
    dicom = path / "dicom"
    if (
        names <= {"dicom", "labels.csv"}
        and dicom.is_dir()
        and not dicom.is_symlink()
        and all(_EXPORT_FILE.match(e.name) and e.is_file() for e in dicom.iterdir())
    ):
        return None
    return "it is not a DICOM export written by `medfed export-dicom` (no medfed marker)"


def export_site_dicom(
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    manufacturer: str,
    seed: int,
    site: int = 0,
    overwrite: bool = False,
) -> ExportedSite:
    """Write one virtual site's images as DICOM files plus a labels CSV.

    Parameters
    ----------
    images : numpy.ndarray
        uint8 ``(N, H, W)`` greyscale images (e.g. PneumoniaMNIST ``(N, 28, 28)``).
    labels : numpy.ndarray
        int ``(N,)`` or ``(N, 1)`` class indices.
    out_dir : path
        Site folder; ``dicom/`` and ``labels.csv`` are written inside.
    manufacturer : str
        Manufacturer (0008,0070) of every file of this site.
    seed : int
        Makes the generated UIDs reproducible (with ``site``).
    site : int
        Site number, mixed into the UIDs so sites never share one.
    overwrite : bool
        Replace an existing site folder, if medfed wrote it (:func:`why_not_export`).

    Returns
    -------
    ExportedSite

    Raises
    ------
    DataError
        On a non-uint8 or non-3-D ``images``, a length mismatch, or an existing export
        without ``overwrite``.
    UnsafeOutputError
        (a ``DataError``) If ``out_dir`` exists and is not an export medfed wrote.

    """
    imgs = np.asarray(images)
    labs = np.asarray(labels).reshape(-1)
    if imgs.dtype != np.uint8 or imgs.ndim != 3:
        raise DataError(f"images must be uint8 (N, H, W), got {imgs.dtype} {imgs.shape}")
    if labs.shape[0] != imgs.shape[0]:
        raise DataError(f"{imgs.shape[0]} images but {labs.shape[0]} labels")
    if not manufacturer:
        raise ConfigError("manufacturer must be a non-empty string")
    out = Path(out_dir)
    dicom_dir = out / "dicom"
    if dicom_dir.is_dir() and any(dicom_dir.iterdir()) and not overwrite:
        raise DataError(f"{dicom_dir} already holds files; pass overwrite=True / --force")

    def fill(tmp: Path) -> list[tuple[str, int]]:
        (tmp / "dicom").mkdir()
        rows: list[tuple[str, int]] = []
        for i in range(imgs.shape[0]):
            entropy = [str(seed), str(site), str(i)]
            sop = generate_uid(_UID_PREFIX, entropy_srcs=[*entropy, "sop"])
            ds = _image_dataset(
                imgs[i],
                sop_uid=sop,
                study_uid=generate_uid(_UID_PREFIX, entropy_srcs=[*entropy, "study"]),
                series_uid=generate_uid(_UID_PREFIX, entropy_srcs=[*entropy, "series"]),
                manufacturer=manufacturer,
                number=i + 1,
            )
            ds.save_as(tmp / "dicom" / f"img_{i:05d}.dcm", enforce_file_format=True)
            rows.append((str(sop), int(labs[i])))
        with (tmp / "labels.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["sop_instance_uid", "label"])
            w.writerows(rows)
        write_marker(tmp, EXPORT_KIND)
        return rows

    rows = write_dir_atomically(
        out, fill, overwrite=overwrite, why_not_ours=why_not_export, what="DICOM export"
    )
    log.info("site %d: wrote %d DICOM files", site, len(rows))
    return ExportedSite(dicom_dir=dicom_dir, labels_csv=out / "labels.csv", count=len(rows))


def export_sites(
    images: np.ndarray,
    labels: np.ndarray,
    site_indices: Sequence[np.ndarray],
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    overwrite: bool = False,
) -> list[ExportedSite]:
    """Export several sites, ``site_<i>/`` each, from per-site index arrays.

    Parameters
    ----------
    images, labels : numpy.ndarray
        As in :func:`export_site_dicom`, for the whole dataset.
    site_indices : Sequence[numpy.ndarray]
        int indices into ``images`` for each site (e.g. from
        ``simulation.data.partition.iid_partition``).
    out_dir : path
        Parent folder.
    seed : int
        UID seed.
    overwrite : bool
        Replace existing site folders medfed wrote (:func:`why_not_export`).

    Returns
    -------
    list of ExportedSite

    """
    imgs = np.asarray(images)
    labs = np.asarray(labels).reshape(-1)
    sites = []
    for s, idx in enumerate(site_indices):
        idx = np.asarray(idx, dtype=np.int64)
        sites.append(
            export_site_dicom(
                imgs[idx],
                labs[idx],
                Path(out_dir) / f"site_{s}",
                manufacturer=SITE_MANUFACTURERS[s % len(SITE_MANUFACTURERS)],
                seed=seed,
                site=s,
                overwrite=overwrite,
            )
        )
    return sites
