"""Hospital-side ``medfed`` commands (registered through the ``medfed.commands`` group).

- ``medfed ingest``: a DICOM export + labels CSV -> a site dataset, with quarantine.
- ``medfed deid-check``: what in a DICOM export could identify a patient.

Neither command ever prints a header value or a file name: files are named by their
number in the sorted walk of the directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.cli import fail
from common.errors import DataError, ExitCode, MedfedError

if TYPE_CHECKING:
    from client.data.ingest import IngestOptions, IngestReport

log = logging.getLogger(__name__)
out_console = Console()

_INGEST_HELP = """\
Turn a hospital DICOM export into a site dataset for federated training.

Files are found recursively by content (DICM preamble or a parseable data set), so
files without extension, gzipped files and DICOMDIR folders work. Pixels are decoded
with pydicom's backends (RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000,
HTJ2K), mapped to physical values (Modality LUT: CT in HU), windowed (the file's VOI
LUT/window or --window), scaled to [0, 1], resized to --size and split into train/val
BY PATIENT.

Every file ends ingested or quarantined with a reason (not_dicom, truncated,
non_image_sop_class, no_pixel_data, unsupported_transfer_syntax,
undecodable_pixel_data, too_large, bad_lut, non_finite_pixels, unlabelled,
duplicate, ...). The manifest holds salted hashes
and counts only: no names, IDs, dates or paths. Exit code 1 only when nothing usable
was found.

LABELS.csv has a header row with a key column (`SOPInstanceUID`, `StudyInstanceUID`,
`AccessionNumber` or `path` relative to DICOM_DIR) and a label column, e.g.

```
SOPInstanceUID,label
1.2.840.113619.2.55.3.1234,pneumonia
```

Re-running reuses work: preprocessed files are cached by content hash (`--cache-dir`),
next to the site's secret salt that keys every hashed identifier.

OUT must be a new or empty folder; `--force` replaces only a site dataset medfed wrote
(its manifest.json and arrays, nothing else). OUT may not be, contain or lie inside the
DICOM export, and may not contain the labels file, the cache or the salt. The dataset,
the cache and the salt are readable by their owner only (0600 files, 0700 folders).
Example:

```
medfed deid-check /mnt/pacs-export
medfed ingest /mnt/pacs-export --labels labels.csv --out /srv/medfed/site
```
"""

_DEID_HELP = """\
Report what in a DICOM export could identify a patient (counts only, never values).

Checks every file found by content under DIR, every element at every depth (file
meta, sequence items, private sequences, sequences stored with VR UN), for:
attributes of DICOM PS3.15 2026c Annex E Table E.1-1 (Basic Application Level
Confidentiality Profile; the table as the dicom-anonymizer package carries it) that
are present and non-empty (names, IDs, dates, institution, UIDs unless
PatientIdentityRemoved=YES, ...), private tags (by block, e.g. (0029,10xx)),
elements that cannot be read, BurnedInAnnotation=YES, and identifier-like file or
folder names (UIDs, dates, long record numbers, or the file's own
PatientID/PatientName).

Findings inside sequences are shown by their path of keywords, item indices as [*]
(e.g. `RequestAttributesSequence[*] > RequestedProcedureID`; private elements by tag
number, e.g. `(0009,1010)[*] > PatientName`). `--json` gives every count.

Exit code 0 when nothing was found, 1 when findings exist.
"""


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _progress() -> Progress:
    from common.cli import console  # logs and the bar share one console

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


_SHOWN_ROWS = 40  # rows of a long deid-check table printed; --json has them all


def _top(rows: dict[str, int], n: int) -> dict[str, int]:
    return dict(sorted(rows.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


def _counts_table(title: str, rows: Counter[str] | dict[str, int], *, key: str) -> Table:
    table = Table(title=title)
    table.add_column(key)
    table.add_column("files", justify="right")
    for name, n in sorted(rows.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(name, str(n))
    return table


def _ingest_with_progress(
    dicom_dir: Path, labels: Path, out: Path, opts: IngestOptions
) -> IngestReport:
    """Run :func:`client.data.ingest.ingest` behind a progress bar."""
    from client.data.ingest import ingest

    with _progress() as bar:
        task_id = bar.add_task("ingesting", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        return ingest(dicom_dir, labels, out, options=opts, progress=tick)


def _print_ingest_report(report: IngestReport) -> None:
    """Print the outcome, modality and manufacturer tables and the one-line summary."""
    from client.data.dicom_read import REASON_HELP, Reason
    from client.data.ingest import summarise_outcomes

    summary = report.manifest["summary"]
    counts = summarise_outcomes(report.outcomes)
    outcome = Table(title="Outcome")
    outcome.add_column("outcome")
    outcome.add_column("files", justify="right")
    outcome.add_column("meaning")
    for name, n in sorted(counts["outcome"].items(), key=lambda kv: (-kv[1], kv[0])):
        meaning = (
            "in the site dataset"
            if name == "ingested"
            else REASON_HELP.get(Reason(name), "")
            if name in Reason._value2member_map_
            else ""
        )
        outcome.add_row(name, str(n), meaning)
    out_console.print(outcome)
    by_mod = Table(title="By modality")
    by_man = Table(title="By manufacturer")
    for table, key_name in ((by_mod, "by_modality"), (by_man, "by_manufacturer")):
        table.add_column(key_name.removeprefix("by_"))
        table.add_column("ingested", justify="right")
        table.add_column("quarantined", justify="right")
        for name, c in summary[key_name].items():
            table.add_row(name, str(c.get("ingested", 0)), str(c.get("quarantined", 0)))
        out_console.print(table)
    splits = ", ".join(
        f"{name}: {v['samples']} images from {v['files']} files"
        for name, v in summary["by_split"].items()
    )
    out_console.print(
        f"[green]site dataset written[/green]: {summary['ingested']} of {summary['files']} "
        f"files ingested ({splits}; {summary['patients']} patients); "
        f"{report.cache_hits} from cache; {report.seconds:.1f} s. "
        f"De-identification findings in {summary['deid']['files_with_findings']} files "
        "(run `medfed deid-check` for details)."
    )


# Long `medfed ingest` options, named here to keep the command readable.
_IntensityOpt = Annotated[
    str,
    typer.Option(
        help="How greyscale values become [0, 1]: auto (file VOI/window; else stored "
        "range for <= 8 bits; else per-image min-max), voi, stored-range, minmax."
    ),
]
_WindowOpt = Annotated[
    str | None,
    typer.Option(
        help="Window applied after the Modality LUT (HU for CT), overriding the file's: "
        "lung, mediastinum, abdomen, liver, bone, brain, subdural, stroke, or CENTER,WIDTH."
    ),
]
_MaxFileMiBOpt = Annotated[
    int | None,
    typer.Option(
        help="Per-file memory budget in MiB: a file whose size, gunzipped or deflated "
        "content, or declared decoded pixel data is larger is quarantined as too_large "
        "before decoding [default: derived from --workers so that all workers fit in "
        "a third of a 24 GB site, e.g. 762 MiB with 2 workers].",
        min=1,
    ),
]
_ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Replace OUT if it is a site dataset medfed wrote (never any other folder); "
        "the new one is written beside it and swapped in.",
    ),
]
_CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Cache of preprocessed files keyed by content hash "
        "[default: OUT's parent/.medfed-ingest-cache]."
    ),
]


def ingest_cmd(
    dicom_dir: Annotated[
        Path, typer.Argument(help="Root of the DICOM export (searched recursively).")
    ],
    labels: Annotated[
        Path, typer.Option("--labels", "-l", help="Labels CSV (key column + label column).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Site dataset directory to write.")],
    task: Annotated[str, typer.Option(help="Learning task; only 'classification' so far.")] = (
        "classification"
    ),
    key: Annotated[
        str | None,
        typer.Option(
            help="Labels CSV key column when several exist: sop_instance_uid, "
            "study_instance_uid, accession_number or path (relative to DICOM_DIR)."
        ),
    ] = None,
    label_column: Annotated[str, typer.Option(help="Labels CSV label column.")] = "label",
    label_names: Annotated[
        str | None,
        typer.Option(help="Comma-separated class names by index, e.g. 'normal,pneumonia'."),
    ] = None,
    size: Annotated[int, typer.Option(help="Output height and width in pixels.")] = 28,
    channels: Annotated[int, typer.Option(help="1 (grey) or 3 (RGB).")] = 1,
    intensity: _IntensityOpt = "auto",
    window: _WindowOpt = None,
    frames: Annotated[
        str, typer.Option(help="Multi-frame files: 'all' frames or only the 'middle' one.")
    ] = "all",
    val_fraction: Annotated[
        float, typer.Option(help="Fraction of PATIENTS in the validation split.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the patient split.")] = 0,
    cache_dir: _CacheDirOpt = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Do not read or write the cache.")
    ] = (False),
    salt_file: Annotated[
        Path | None,
        typer.Option(help="Site secret used to hash identifiers [default: CACHE_DIR/site-salt]."),
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Worker processes [default: min(4, CPUs)].")
    ] = _default_workers(),
    max_file_mib: _MaxFileMiBOpt = None,
    force: _ForceOpt = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the manifest summary as JSON on stdout.")
    ] = False,
) -> None:
    """Ingest a DICOM export into a site dataset (help text: ``_INGEST_HELP``)."""
    from client.data.dicom_read import Preprocessing
    from client.data.ingest import IngestOptions

    try:
        prep = Preprocessing.with_window(
            window, size=size, channels=channels, intensity=intensity, frames=frames
        )
        cache = None if no_cache else (cache_dir or out.parent / ".medfed-ingest-cache")
        opts = IngestOptions(
            prep=prep,
            task=task,
            val_fraction=val_fraction,
            seed=seed,
            key=key,
            label_column=label_column,
            label_names=[n.strip() for n in label_names.split(",")] if label_names else None,
            cache_dir=cache,
            salt_file=salt_file,
            workers=workers,
            overwrite=force,
            max_file_bytes=max_file_mib * 1024**2 if max_file_mib is not None else None,
        )
        report = _ingest_with_progress(dicom_dir, labels, out, opts)
    except MedfedError as exc:
        nothing = isinstance(exc, DataError) and str(exc).startswith("no usable image")
        raise fail(exc, code=ExitCode.FINDINGS if nothing else None) from None

    summary = report.manifest["summary"]
    if json_out:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    _print_ingest_report(report)


def deid_check_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder of DICOM files to check.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a folder of DICOM files for identifying content (help: ``_DEID_HELP``)."""
    from client.data.deid import check_directory

    if not directory.is_dir():
        raise fail(f"{directory} is not a directory")
    report = check_directory(directory)
    d = report.to_dict()
    if json_out:
        typer.echo(json.dumps(d, indent=2, sort_keys=True))
    else:
        out_console.print(
            f"checked {d['files_checked']} DICOM files of {d['files_seen']} files; "
            f"{d['files_with_findings']} with findings, {d['files_only_nested']} with "
            "attributes only inside sequences"
        )
        out_console.print(f"attribute list: {d['profile']}")
        if d["attributes"]:
            attrs = Table(title="Table E.1-1 attributes present")
            for name in ("attribute", "files", "inside sequences", "only inside sequences"):
                attrs.add_column(name, justify="left" if name == "attribute" else "right")
            for name, n in sorted(d["attributes"].items(), key=lambda kv: (-kv[1], kv[0])):
                nested = (d["nested_attributes"].get(name, 0), d["only_nested"].get(name, 0))
                attrs.add_row(name, str(n), *(str(v) for v in nested))
            out_console.print(attrs)
        for title, key, rows in (
            ("Inside sequences (item indices as [*])", "path", d["nested_paths"]),
            ("Private blocks (tag numbers)", "block", d["private_blocks"]),
        ):
            if rows:
                out_console.print(_counts_table(title, _top(rows, _SHOWN_ROWS), key=key))
                if len(rows) > _SHOWN_ROWS:
                    out_console.print(f"... {len(rows) - _SHOWN_ROWS} more; --json lists all")
        other = {
            "private tags": d["private_tag_files"],
            "unreadable elements": d["unreadable_files"],
            "BurnedInAnnotation = YES": d["burned_in_annotation"],
            **{f"file name: {k}": v for k, v in d["filename_identifiers"].items()},
        }
        out_console.print(_counts_table("Other findings", other, key="finding"))
    raise typer.Exit(ExitCode.FINDINGS if report.has_findings else ExitCode.OK)


def register(app: typer.Typer) -> None:
    """Add the hospital commands to the root ``medfed`` app."""
    app.command("ingest", help=_INGEST_HELP, no_args_is_help=True)(ingest_cmd)
    app.command("deid-check", help=_DEID_HELP, no_args_is_help=True)(deid_check_cmd)
