"""``medfed export-dicom``: virtual hospitals as DICOM exports (see ``export_dicom``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from common.cli import fail
from common.errors import MedfedError

console = Console()

_HELP = """\
Write each virtual site's images as real, de-identified DICOM files.

Loads a MedMNIST-style npz (e.g. PneumoniaMNIST: `SPLIT_images` uint8 (N, 28, 28),
`SPLIT_labels`), splits it IID into `--sites` sites and writes, per site,
`OUT/site_I/dicom/*.dcm` (Secondary Capture, Modality CR, Explicit VR Little Endian,
generated UIDs, a Manufacturer per site, no identifying values) and
`OUT/site_I/labels.csv` keyed by SOP Instance UID. Ingesting them gives back the
npz pixels exactly (uint8 / 255). Then run the hospital path:

```
medfed export-dicom --data pneumoniamnist.npz --sites 3 --out exports
medfed deid-check exports/site_0/dicom
medfed ingest exports/site_0/dicom --labels exports/site_0/labels.csv --out sites/site_0
```
"""


def export_dicom_cmd(
    data: Annotated[Path, typer.Option(help="MedMNIST-style .npz file.")],
    sites: Annotated[int, typer.Option(help="Number of virtual sites.")],
    out: Annotated[Path, typer.Option(help="Folder that receives site_<i>/ folders.")],
    split: Annotated[str, typer.Option(help="Which split of the npz to export.")] = "train",
    seed: Annotated[int, typer.Option(help="Seed of the IID partition and the UIDs.")] = 0,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace existing site_<i>/ folders written by medfed export-dicom "
            "(never any other folder).",
        ),
    ] = False,
) -> None:
    """Export virtual sites as DICOM (help text: ``_HELP``)."""
    from simulation.data.export_dicom import export_sites
    from simulation.data.partition import iid_partition

    try:
        if not data.is_file():
            raise MedfedError(f"{data} not found")
        with np.load(data, allow_pickle=False) as npz:
            if f"{split}_images" not in npz:
                raise MedfedError(
                    f"{data.name} has no '{split}_images' array; arrays: {sorted(npz.files)}"
                )
            images = np.asarray(npz[f"{split}_images"])
            labels = np.asarray(npz[f"{split}_labels"]).reshape(-1)
        parts = iid_partition(labels, sites, seed=seed)
        written = export_sites(images, labels, parts, out, seed=seed, overwrite=force)
    except MedfedError as exc:
        raise fail(exc) from None
    for i, site in enumerate(written):
        console.print(f"site_{i}: {site.count} DICOM files, labels in {site.labels_csv.name}")


def register(app: typer.Typer) -> None:
    """Add ``export-dicom`` to the root ``medfed`` app."""
    app.command("export-dicom", help=_HELP, no_args_is_help=True)(export_dicom_cmd)
