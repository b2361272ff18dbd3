"""Ingest a hospital DICOM export into a site dataset (``medfed ingest``).

Every file found under the export ends either *ingested* or *quarantined* with a
machine-readable :class:`~client.data.dicom_read.Reason`; one bad file never stops the
rest. Labels come from a CSV keyed by an identifier the hospital has (SOP Instance UID,
Study Instance UID, Accession Number, or the path relative to the export). Images are
split into train and validation by patient, so one patient's images never fall into both.

Privacy: identifiers are hashed with a per-site secret salt as soon as they are read;
the manifest, the cache and the logs hold only salted hashes, counts, dictionary terms
(modality, SOP class, transfer syntax), manufacturer categories (vendor family and
salted hash, never the Manufacturer value) and file numbers. File names
and paths are never logged or written (they may carry PHI); a file is named by its number
in the sorted walk (``file #17``).

Re-running on the same export reuses work: each file's preprocessed frames (``.npy``
bytes) and facts (JSON with salted hashes only) are cached in one file per entry, under
a key made of the SHA-256 of the file's bytes, the preprocessing and the salt.

Imports numpy and pydicom only (no torch, no flwr).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pydicom

from client.data import deid
from client.data.dicom_read import (
    PIPELINE_VERSION,
    ByteBudget,
    Preprocessing,
    Reason,
    UnusableInputError,
    dataset_facts,
    dataset_identifiers,
    default_file_budget,
    discover_files,
    gunzip_if_needed,
    parse_dataset,
    quiet_pydicom_logs,
    read_dicom,
    read_file_bytes,
    salted_hash,
)
from common.errors import ConfigError, DataError, DataNotFoundError
from common.fsutil import atomic_write_bytes, private_mkdir
from common.site_dataset import SplitArrays, check_output_dir, write_site_dataset

__all__ = [
    "KEY_COLUMNS",
    "FileOutcome",
    "IngestOptions",
    "IngestReport",
    "LabelTable",
    "ingest",
    "load_or_create_salt",
    "read_labels_csv",
]

log = logging.getLogger(__name__)

#: Labels CSV key columns: accepted header spellings -> canonical key.
KEY_COLUMNS: dict[str, str] = {
    "sopinstanceuid": "sop_instance_uid",
    "studyinstanceuid": "study_instance_uid",
    "accessionnumber": "accession_number",
    "path": "path",
    "relativepath": "path",
    "file": "path",
}
_KEY_PRIORITY = ("sop_instance_uid", "path", "accession_number", "study_instance_uid")
_CACHE_FORMAT = "medfed-ingest-cache-3"


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def load_or_create_salt(path: str | os.PathLike[str]) -> bytes:
    """Read the site's secret salt, creating 32 random bytes (mode 0600) if absent.

    The salt keeps hashed identifiers in a manifest from being matched against guessed
    PatientIDs; it never leaves the site and must be kept for hashes to stay stable.
    """
    p = Path(path)
    if p.is_file():
        salt = p.read_bytes()
        if len(salt) < 16:
            raise DataError(f"salt file {p} is shorter than 16 bytes; delete it to recreate")
        return salt
    private_mkdir(p.parent)
    salt = secrets.token_bytes(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(salt)
    return salt


# ---------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelTable:
    """Labels keyed by salted hashes of an identifier.

    Attributes
    ----------
    key : str
        ``sop_instance_uid``, ``study_instance_uid``, ``accession_number`` or ``path``.
    labels : dict[str, int]
        Salted hash of the key value -> class index.
    label_names : list of str
        Class name of each index.
    fingerprint : str
        Salted SHA-256 of the CSV content (provenance).

    """

    key: str
    labels: dict[str, int]
    label_names: list[str]
    fingerprint: str


def _key_column(columns: Mapping[str, str], key: str | None) -> str:
    """Return the canonical key column to use: ``key`` if given, else the preferred one."""
    if key is not None:
        key = KEY_COLUMNS.get(_norm(key), key)
        if key not in columns:
            raise DataError(
                f"labels CSV has no {key!r} column; key columns found: {sorted(columns)}"
            )
        return key
    if not columns:
        raise DataError(
            "labels CSV needs a key column: SOPInstanceUID, StudyInstanceUID, "
            "AccessionNumber or path (relative to the DICOM directory)"
        )
    return next(k for k in _KEY_PRIORITY if k in columns)


def read_labels_csv(
    path: str | os.PathLike[str],
    *,
    salt: bytes,
    key: str | None = None,
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> LabelTable:
    """Read a labels CSV; key values are hashed with ``salt`` at once.

    Parameters
    ----------
    path : path
        CSV with a header row: one key column (``SOPInstanceUID`` /
        ``sop_instance_uid``, ``StudyInstanceUID``, ``AccessionNumber``, or ``path``
        relative to the export root, ``/``-separated) and a label column.
    salt : bytes
        The site's salt (:func:`load_or_create_salt`).
    key : str, optional
        Which key column to use when several are present.
    label_column : str
        Name of the label column.
    label_names : Sequence[str], optional
        Class names by index; labels in the CSV may then be names or indices.
        Default: ``0..max`` when all labels are integers, else the sorted names.

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    DataError
        On a missing key/label column, an unknown label, or one key with two labels
        (the row number is given, never the value).

    """
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"labels CSV {p} not found")
    raw = p.read_bytes()
    text = raw.decode("utf-8-sig")
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    columns = {KEY_COLUMNS[_norm(h)]: h for h in header if _norm(h) in KEY_COLUMNS}
    key = _key_column(columns, key)
    label_col = next((h for h in header if _norm(h) == _norm(label_column)), None)
    if label_col is None:
        raise DataError(f"labels CSV has no {label_column!r} column (use --label-column)")

    rows: list[tuple[int, str, str]] = []
    for rowno, row in enumerate(reader, start=2):
        k = (row.get(columns[key]) or "").strip()
        v = (row.get(label_col) or "").strip()
        if not k or not v:
            continue
        if key == "path":
            k = PurePosixPath(k.replace("\\", "/")).as_posix().lstrip("./")
        rows.append((rowno, k, v))
    if not rows:
        raise DataError(f"labels CSV {p.name} has no rows with both a key and a label")

    values = sorted({v for _, _, v in rows})
    if label_names:
        names = [str(n) for n in label_names]
    elif all(v.lstrip("-").isdigit() for v in values):
        names = [str(i) for i in range(max(int(v) for v in values) + 1)]
    else:
        names = values
    index = {n: i for i, n in enumerate(names)}

    labels: dict[str, int] = {}
    for rowno, k, v in rows:
        if v in index:
            cls = index[v]
        elif v.isdigit() and int(v) < len(names):
            cls = int(v)
        else:
            raise DataError(f"labels CSV row {rowno}: label not in label names {names}")
        h = salted_hash(k, salt)
        if labels.setdefault(h, cls) != cls:
            raise DataError(f"labels CSV row {rowno}: key already has a different label")
    return LabelTable(
        key=key,
        labels=labels,
        label_names=names,
        fingerprint=hashlib.sha256(salt + raw).hexdigest(),
    )


# ------------------------------------------------------------------------ per file


@dataclass
class _FileResult:
    """What one worker learned about one file (no raw identifier, no path)."""

    content_hash: str
    reason: str | None = None
    detail: str = ""
    facts: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)  # salted hashes
    deid: dict[str, Any] = field(default_factory=dict)
    id_tokens: list[str] = field(default_factory=list)  # salted hashes
    pixels: np.ndarray | None = None
    cached: bool = False
    #: Largest size checked against the per-file byte budget (:class:`ByteBudget`).
    need_bytes: int = 0


def _cache_key(content_hash: str, prep_json: str, salt: bytes) -> str:
    salt_id = hashlib.sha256(salt).hexdigest()
    return hashlib.sha256(
        f"{_CACHE_FORMAT}|{deid.CHECK_VERSION}|{content_hash}|{prep_json}|{salt_id}".encode()
    ).hexdigest()


_CACHE_MAGIC = b"MEDFEDC1"


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.entry"


def _cache_load(cache_dir: Path, key: str, content_hash: str) -> _FileResult | None:
    """Read one cache entry: magic, 8-byte JSON length, JSON facts, then ``.npy`` bytes."""
    try:
        blob = _cache_path(cache_dir, key).read_bytes()
    except OSError:
        return None
    try:
        if not blob.startswith(_CACHE_MAGIC):
            return None
        n = int.from_bytes(blob[8:16], "little")
        meta = json.loads(blob[16 : 16 + n])
        res = _FileResult(
            content_hash=content_hash,
            reason=meta["reason"],
            detail=meta["detail"],
            facts=meta["facts"],
            ids=meta["ids"],
            deid=meta["deid"],
            id_tokens=meta["id_tokens"],
            cached=True,
            need_bytes=int(meta["need_bytes"]),
        )
        if res.reason is None:
            res.pixels = np.load(io.BytesIO(blob[16 + n :]), allow_pickle=False)
        return res
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None  # a damaged entry is recomputed


def _within_budget(hit: _FileResult, limit: int) -> _FileResult | None:
    """Return a cached result as this run's byte budget (``limit`` bytes) decides it.

    ``need_bytes`` is the largest size the file needed (a lower bound when it was over
    the budget then): over ``limit`` the file is ``too_large`` now whatever it was; a
    ``too_large`` result that may fit ``limit`` is recomputed (``None``).
    """
    if hit.reason == Reason.TOO_LARGE.value:
        return hit if hit.need_bytes > limit else None
    if hit.need_bytes > limit:
        return _FileResult(
            content_hash=hit.content_hash,
            reason=Reason.TOO_LARGE.value,
            detail="over the per-file budget",
            facts=hit.facts,
            deid=hit.deid,
            id_tokens=hit.id_tokens,
            cached=True,
            need_bytes=hit.need_bytes,
        )
    return hit


def _cache_store(cache_dir: Path, key: str, res: _FileResult) -> None:
    """Write one cache entry atomically (temporary file, then rename)."""
    final = _cache_path(cache_dir, key)
    meta = json.dumps(
        {
            "reason": res.reason,
            "detail": res.detail,
            "facts": res.facts,
            "ids": res.ids,
            "deid": res.deid,
            "id_tokens": res.id_tokens,
            "need_bytes": res.need_bytes,
        }
    ).encode()
    buf = io.BytesIO()
    buf.write(_CACHE_MAGIC + len(meta).to_bytes(8, "little") + meta)
    if res.pixels is not None:
        np.save(buf, res.pixels, allow_pickle=False)
    try:
        atomic_write_bytes(final, buf.getvalue(), durable=False)  # 0600 in 0700 dirs
    except OSError as exc:
        log.warning("ingest cache not written (%s); continuing without it", type(exc).__name__)


def _manufacturer_key(family: str, raw: str, salt: bytes) -> str:
    """Summary key of a Manufacturer (0008,0070): vendor family and 8 hex of its salted hash.

    E.g. ``"GE #3fa9c2d1"``: manufacturers stay countable and distinct within a site
    while the header value (which may name a hospital) is never logged or stored.
    """
    if not raw:
        return ""
    return f"{family or 'other'} #{salted_hash(raw, salt)[:8]}"


def _process_bytes(
    raw: bytes, content_hash: str, prep: Preprocessing, salt: bytes, limit: int
) -> _FileResult:
    """Check and preprocess one file's bytes; never raises for bad input.

    ``limit`` is the per-file byte budget (:class:`~client.data.dicom_read.ByteBudget`):
    file size, gunzipped size, inflated deflate data set and declared decoded pixels.
    """
    res = _FileResult(content_hash=content_hash)
    budget = ByteBudget(limit=limit)
    ds = None
    try:
        budget.check(len(raw), "file size")
        data = gunzip_if_needed(raw, budget=budget)
        ds = parse_dataset(data, budget=budget)
        try:
            res.deid = deid.check_dataset(ds).to_dict()
            res.id_tokens = sorted(deid.hash_tokens(deid.identifier_tokens(ds), salt))
        except Exception:  # the check must never stop ingestion
            res.deid = {}
        image = read_dicom(data, prep, ds=ds, budget=budget)
    except Exception as exc:  # never crash on one file
        if isinstance(exc, UnusableInputError):
            res.reason, res.detail = exc.reason.value, exc.detail
        else:
            res.reason, res.detail = Reason.UNEXPECTED_ERROR.value, type(exc).__name__
        if ds is not None:
            try:
                res.facts = dataset_facts(ds)  # for the summary counts only
                res.facts["manufacturer"] = _manufacturer_key(
                    res.facts["manufacturer"], dataset_identifiers(ds)["manufacturer"], salt
                )
            except Exception:
                res.facts = {}
        res.need_bytes = budget.largest
        return res
    res.need_bytes = budget.largest
    res.facts = {
        "modality": image.modality,
        "manufacturer": _manufacturer_key(
            image.manufacturer, image.identifiers.get("manufacturer", ""), salt
        ),
        "sop_class": image.sop_class,
        "transfer_syntax": image.transfer_syntax,
        "photometric": image.photometric,
    }
    res.ids = {k: salted_hash(v, salt) for k, v in image.identifiers.items()}
    res.pixels = image.pixels
    return res


def _read(path: Path, limit: int) -> bytes | _FileResult:
    """Return the file's bytes, or its quarantine result (unreadable, over the budget).

    A file over the byte budget is not read (only its size is looked at).
    """
    budget = ByteBudget(limit=limit)
    try:
        return read_file_bytes(path, budget=budget)
    except UnusableInputError as exc:
        return _FileResult(
            content_hash="",
            reason=exc.reason.value,
            detail=exc.detail,
            need_bytes=budget.largest,
        )


def _lookup(
    path: Path, prep_json: str, salt: bytes, cache_dir: Path | None, limit: int
) -> tuple[str, _FileResult | None]:
    """Hash a file and return ``(cache key, cached result or None)``; runs in this process.

    An unreadable file, or one over the byte budget ``limit``, gets a key of ``""`` and
    its quarantine result.
    """
    raw = _read(path, limit)
    if isinstance(raw, _FileResult):
        return "", raw
    content_hash = hashlib.sha256(raw).hexdigest()
    key = _cache_key(content_hash, prep_json, salt)
    hit = _cache_load(cache_dir, key, content_hash) if cache_dir is not None else None
    return key, (_within_budget(hit, limit) if hit is not None else None)


def _work(
    path: str, key: str, prep: Preprocessing, salt: bytes, cache_dir: str | None, limit: int
) -> _FileResult:
    """Process one file and store the result under ``key`` (runs in a worker process)."""
    raw = _read(Path(path), limit)
    if isinstance(raw, _FileResult):
        return raw
    content_hash = hashlib.sha256(raw).hexdigest()
    res = _process_bytes(raw, content_hash, prep, salt, limit)
    if cache_dir is not None and key == _cache_key(
        content_hash, json.dumps(prep.to_manifest(), sort_keys=True), salt
    ):  # the file did not change since it was looked up
        _cache_store(Path(cache_dir), key, res)
    return res


# ----------------------------------------------------------------------- orchestration


@dataclass(frozen=True, kw_only=True)
class IngestOptions:
    """Options of :func:`ingest`.

    Parameters
    ----------
    prep : Preprocessing
        Pixel pipeline (size, channels, intensity, window, frames).
    task : str
        ``"classification"`` (the only task ingestion supports so far).
    val_fraction : float
        Fraction of *patients* put in the validation split, in ``[0, 1)``.
    seed : int
        Seed of the patient shuffle for the split.
    key : str, optional
        Labels CSV key column (auto-detected when ``None``).
    label_column : str
        Labels CSV label column.
    label_names : Sequence[str], optional
        Class names by index.
    cache_dir : path, optional
        Where preprocessed files are cached; ``None`` disables the cache.
    salt_file : path, optional
        The site's secret salt; default ``<cache_dir>/site-salt`` (or a fresh random
        salt, not saved, when there is no cache).
    workers : int
        Worker processes that read and decode files (at least one; a decoder that ends
        its process costs only its own file, quarantined as ``decoder_crashed``).
    overwrite : bool
        Replace an existing site dataset.
    max_file_bytes : int, optional
        Per-file byte budget (bytes): a file whose size, gunzipped size, inflated
        deflate data set (PS3.5 A.5) or declared decoded pixel data (Rows x Columns x
        frames x samples x bytes per sample) is larger is quarantined ``too_large``
        before that memory is allocated. Default
        :func:`~client.data.dicom_read.default_file_budget` of ``workers``: the
        workers together stay inside a third of a 24 GB, 2-core site's memory.

    """

    prep: Preprocessing = field(default_factory=Preprocessing)
    task: str = "classification"
    val_fraction: float = 0.2
    seed: int = 0
    key: str | None = None
    label_column: str = "label"
    label_names: Sequence[str] | None = None
    cache_dir: Path | None = None
    salt_file: Path | None = None
    workers: int = 1
    overwrite: bool = False
    max_file_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.task != "classification":
            raise ConfigError(f"task={self.task!r}: ingestion supports 'classification' only")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers} must be >= 1")
        if self.max_file_bytes is not None and self.max_file_bytes < 1024**2:
            raise ConfigError(
                f"max_file_bytes={self.max_file_bytes} must be at least 1 MiB "
                "(or None for the default derived from the worker count)"
            )

    @property
    def file_budget(self) -> int:
        """The per-file byte budget in force (bytes): ``max_file_bytes`` or the default."""
        if self.max_file_bytes is not None:
            return self.max_file_bytes
        return default_file_budget(self.workers)


@dataclass
class FileOutcome:
    """Outcome of one input file.

    ``rel_path`` is kept in memory for the caller (who chose the directory) and is
    never logged or written by medfed.
    """

    number: int
    rel_path: str
    reason: str | None
    detail: str
    modality: str
    manufacturer: str
    samples: int = 0
    split: str | None = None
    cached: bool = False

    @property
    def ingested(self) -> bool:
        """Whether the file's frames are in the site dataset."""
        return self.reason is None


@dataclass
class IngestReport:
    """What :func:`ingest` did."""

    manifest: dict[str, Any]
    outcomes: list[FileOutcome]
    seconds: float

    @property
    def ingested(self) -> int:
        """Number of files ingested."""
        return sum(o.ingested for o in self.outcomes)

    @property
    def quarantined(self) -> int:
        """Number of files quarantined."""
        return len(self.outcomes) - self.ingested

    @property
    def cache_hits(self) -> int:
        """Files whose result came from the cache."""
        return sum(o.cached for o in self.outcomes)


def _split_groups(group_keys: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign each patient group to ``train`` or ``val`` (seeded shuffle of groups).

    Groups are taken in order of first appearance (files are read in sorted path order),
    not sorted by key: keys are salted hashes, and the salt is random per site, so
    sorting by them would make the split differ between two fresh ingests of the same
    files with the same seed.
    """
    uniq = list(dict.fromkeys(group_keys))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    n_val = round(val_fraction * len(uniq))
    # At least one patient in each split when asked for a validation split and possible.
    n_val = min(max(n_val, 1), len(uniq) - 1) if val_fraction > 0 and len(uniq) >= 2 else 0
    val = {uniq[i] for i in order[:n_val]}
    return {g: ("val" if g in val else "train") for g in uniq}


def _counts(outcomes: Sequence[FileOutcome], attr: str) -> dict[str, dict[str, int]]:
    table: dict[str, Counter[str]] = {}
    for o in outcomes:
        name = getattr(o, attr) or "unknown"
        table.setdefault(name, Counter())["ingested" if o.ingested else "quarantined"] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


def ingest(
    dicom_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    options: IngestOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Turn a DICOM export into a site dataset, quarantining what cannot be used.

    Parameters
    ----------
    dicom_dir : path
        Root of the export; searched recursively, files recognised by content.
    labels_csv : path
        Labels keyed by SOP Instance UID, Study Instance UID, Accession Number or the
        path relative to ``dicom_dir`` (see :func:`read_labels_csv`).
    out_dir : path
        The site dataset directory to write (:func:`common.site_dataset.write_site_dataset`):
        images float32 ``(N, C, size, size)`` in ``[0, 1]``, labels int64 ``(N,)``,
        groups int64 ``(N,)`` (patient group, the DP and split unit).
    options : IngestOptions, optional
        Preprocessing, split, cache and worker settings.
    progress : callable, optional
        Called as ``progress(done, total)`` after each file.

    Returns
    -------
    IngestReport
        The manifest written and one :class:`FileOutcome` per input file.

    Raises
    ------
    DataNotFoundError
        If ``dicom_dir`` or ``labels_csv`` does not exist.
    DataError
        If no file could be ingested (the site dataset is then not written), or the
        labels CSV is invalid.

    """
    opts = options or IngestOptions()
    t0 = time.perf_counter()
    root = Path(dicom_dir)
    if not root.is_dir():
        raise DataNotFoundError(f"DICOM directory {root} not found")
    cache_dir = Path(opts.cache_dir) if opts.cache_dir is not None else None
    salt_path = opts.salt_file or (cache_dir / "site-salt" if cache_dir is not None else None)
    inputs = {
        "DICOM export": root,
        "labels file": labels_csv,
        "ingest cache": cache_dir,
        "salt file": salt_path,
    }
    check_output_dir(out_dir, overwrite=opts.overwrite, inputs=inputs)  # before any work
    salt = load_or_create_salt(salt_path) if salt_path is not None else secrets.token_bytes(32)
    table = read_labels_csv(
        labels_csv,
        salt=salt,
        key=opts.key,
        label_column=opts.label_column,
        label_names=opts.label_names,
    )

    with quiet_pydicom_logs():
        return _ingest(root, table, out_dir, opts, salt, cache_dir, progress, t0)


#: Files per task sent to a worker process (the round trip costs about a millisecond).
_CHUNK = 4


def _contained(
    indices: Sequence[int],
    job: Callable[[int], tuple[Any, ...]],
    workers: int,
    done_with: Callable[[int, _FileResult], None],
) -> None:
    """Run :func:`_work` on ``job(i)`` for each index in worker processes, crash-contained.

    A native decoder can end its process in ways no ``except`` catches (an ``abort`` from
    a C++ exception, a segmentation fault, the kernel's out-of-memory killer). Files go to
    a pool of ``workers`` processes in chunks of :data:`_CHUNK`, at most ``2 * workers``
    chunks in flight. When a worker dies the pool breaks; the files in flight then run
    again one at a time, each in a process of its own, so the file that kills its process
    is known and quarantined as ``decoder_crashed`` while every other file gets its own
    outcome. ``done_with(i, result)`` is called once per index, in completion order.
    """
    chunks = deque(list(indices[k : k + _CHUNK]) for k in range(0, len(indices), _CHUNK))
    window = 2 * max(1, workers)  # chunks in flight
    in_flight: dict[Future[list[_FileResult]], list[int]] = {}
    pool: ProcessPoolExecutor | None = None
    try:
        while chunks or in_flight:
            if pool is None:
                pool = ProcessPoolExecutor(max_workers=max(1, min(workers, len(chunks))))
            while chunks and len(in_flight) < window:
                chunk = chunks.popleft()
                in_flight[pool.submit(_work_chunk, [job(i) for i in chunk])] = chunk
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                wait(in_flight)  # the pool is dead: everything in flight ends now
                done = set(in_flight)
            suspects: list[int] = []
            for fut in done:
                chunk = in_flight.pop(fut)
                if isinstance(fut.exception(), BrokenProcessPool):
                    suspects.extend(chunk)
                else:
                    for i, result in zip(chunk, fut.result(), strict=True):
                        done_with(i, result)
            if suspects:
                pool.shutdown(wait=True)
                pool = None
                for i in sorted(suspects):
                    done_with(i, _alone(job(i)))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def _work_chunk(jobs: list[tuple[Any, ...]]) -> list[_FileResult]:
    """:func:`_work` on a few files in one worker call (fewer round trips)."""
    return [_work(*args) for args in jobs]


def _alone(args: tuple[Any, ...]) -> _FileResult:
    """:func:`_work` in a process of its own; a dead process means ``decoder_crashed``."""
    with ProcessPoolExecutor(max_workers=1) as solo:
        try:
            return solo.submit(_work, *args).result()
        except BrokenProcessPool:
            log.warning("a decoder ended its worker process; the file is quarantined")
            return _FileResult(content_hash="", reason=Reason.DECODER_CRASHED.value)


def _process_files(
    paths: Sequence[Path],
    opts: IngestOptions,
    salt: bytes,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None,
) -> list[_FileResult]:
    """Read, check and preprocess every file (cache hits first, misses in workers)."""
    total = len(paths)
    limit = opts.file_budget
    prep_json = json.dumps(opts.prep.to_manifest(), sort_keys=True)
    found: list[_FileResult | None] = [None] * total
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    # Cache hits are served here; only misses go to the worker processes.
    keys: list[str] = []
    for i, p in enumerate(paths):
        key, hit = _lookup(p, prep_json, salt, cache_dir, limit)
        keys.append(key)
        if hit is not None:
            found[i] = hit
            tick()
    cache_arg = str(cache_dir) if cache_dir is not None else None

    def job(i: int) -> tuple[str, str, Preprocessing, bytes, str | None, int]:
        return (str(paths[i]), keys[i], opts.prep, salt, cache_arg, limit)

    def done_with(i: int, result: _FileResult) -> None:
        found[i] = result
        tick()

    _contained([i for i, r in enumerate(found) if r is None], job, opts.workers, done_with)
    # Every miss was computed above; the fallback only keeps the types honest.
    return [
        r if r is not None else _FileResult(content_hash="", reason=Reason.UNEXPECTED_ERROR.value)
        for r in found
    ]


def _file_label(
    r: _FileResult, rel: str, table: LabelTable, salt: bytes, seen: set[str]
) -> tuple[int | None, str | None, str]:
    """Return (label, quarantine reason, detail) of one processed file."""
    if r.reason is not None:
        return None, r.reason, r.detail
    if r.pixels is None:
        return None, Reason.UNEXPECTED_ERROR.value, "no pixels in result"
    if r.content_hash in seen:
        return None, Reason.DUPLICATE.value, ""
    lookup = salted_hash(rel, salt) if table.key == "path" else r.ids.get(table.key)
    label = table.labels.get(lookup) if lookup else None
    if label is None:
        return None, Reason.UNLABELLED.value, f"no {table.key} match"
    return label, None, r.detail


@dataclass
class _Sorted:
    """Every file's outcome, the quarantine entries and the images kept."""

    outcomes: list[FileOutcome]
    quarantine: list[dict[str, Any]]
    keep: list[tuple[int, np.ndarray, int, str]]  # (file idx, pixels, label, group)
    deid_report: deid.DeidReport


def _sort_files(
    root: Path,
    paths: Sequence[Path],
    results: Sequence[_FileResult],
    table: LabelTable,
    salt: bytes,
) -> _Sorted:
    """Label or quarantine each file, collect de-identification findings."""
    done = _Sorted([], [], [], deid.DeidReport(files_seen=len(paths)))
    seen: set[str] = set()
    for i, (p, r) in enumerate(zip(paths, results, strict=True)):
        rel = p.relative_to(root).as_posix()
        if r.deid:
            f = deid.FileFindings.from_dict(r.deid)
            f.filename = deid.filename_findings(rel, r.id_tokens, salt=salt)
            done.deid_report.add(f)
        label, reason, detail = _file_label(r, rel, table, salt, seen)
        done.outcomes.append(
            FileOutcome(
                number=i + 1,
                rel_path=rel,
                reason=reason,
                detail=detail,
                modality=r.facts.get("modality", ""),
                manufacturer=r.facts.get("manufacturer", ""),
                cached=r.cached,
            )
        )
        if reason is not None:
            log.info("file #%d quarantined: %s", i + 1, reason)
            done.quarantine.append(
                {
                    "file": i + 1,
                    "input": salted_hash(r.content_hash, salt) if r.content_hash else "",
                    "reason": reason,
                    "detail": detail,
                }
            )
            continue
        if label is None or r.pixels is None:  # unreachable: both checked above
            continue
        seen.add(r.content_hash)
        group_key = (
            r.ids.get("patient_id")
            or r.ids.get("study_instance_uid")
            or r.ids.get("sop_instance_uid")
            or salted_hash(r.content_hash, salt)
        )
        done.keep.append((i, r.pixels, label, group_key))
    return done


def _make_splits(
    keep: Sequence[tuple[int, np.ndarray, int, str]],
    outcomes: Sequence[FileOutcome],
    opts: IngestOptions,
) -> tuple[dict[str, SplitArrays], int]:
    """Split the kept images by patient; return the splits and the number of patients."""
    split_of = _split_groups([g for *_, g in keep], opts.val_fraction, opts.seed)
    group_ids = {g: n for n, g in enumerate(split_of)}  # first-appearance order
    parts: dict[str, dict[str, list[np.ndarray]]] = {}
    for i, px, label, g in keep:
        split = split_of[g]
        n = int(px.shape[0])
        outcomes[i].samples, outcomes[i].split = n, split
        d = parts.setdefault(split, {"images": [], "labels": [], "groups": []})
        d["images"].append(px)
        d["labels"].append(np.full(n, label, dtype=np.int64))
        d["groups"].append(np.full(n, group_ids[g], dtype=np.int64))
    splits = {
        name: SplitArrays.create(
            np.concatenate(d["images"]), np.concatenate(d["labels"]), np.concatenate(d["groups"])
        )
        for name, d in sorted(parts.items(), key=lambda kv: kv[0] != "train")
    }
    return splits, len(group_ids)


def _summary(
    outcomes: Sequence[FileOutcome],
    splits: Mapping[str, SplitArrays],
    patients: int,
    table: LabelTable,
    deid_report: deid.DeidReport,
) -> dict[str, Any]:
    """Return the manifest's summary: counts by outcome, modality, split and label."""
    total = len(outcomes)
    ingested = [o for o in outcomes if o.ingested]
    return {
        "files": total,
        "ingested": len(ingested),
        "quarantined": total - len(ingested),
        "samples": int(sum(o.samples for o in ingested)),
        "patients": patients,
        "by_outcome": dict(sorted(Counter(o.reason or "ingested" for o in outcomes).items())),
        "by_modality": _counts(outcomes, "modality"),
        "by_manufacturer": _counts(outcomes, "manufacturer"),
        "by_split": {
            name: {"files": sum(o.split == name for o in ingested), "samples": len(s)}
            for name, s in splits.items()
        },
        "by_label": {
            table.label_names[c]: int(n)
            for c, n in enumerate(
                np.bincount(
                    np.concatenate([s.labels for s in splits.values()]),
                    minlength=len(table.label_names),
                )
            )
        },
        "deid": deid_report.to_dict(),
    }


def _preprocessing(opts: IngestOptions) -> dict[str, Any]:
    """Return the manifest's preprocessing entry (pixels, patient split, file limits)."""
    return {
        **opts.prep.to_manifest(),
        "split": {
            "unit": "patient (PatientID, else StudyInstanceUID, else SOPInstanceUID)",
            "val_fraction": opts.val_fraction,
            "seed": opts.seed,
        },
        "limits": {
            "max_file_bytes": opts.file_budget,
            "checked": "file size, gunzipped size, inflated deflate data set, declared "
            "decoded pixel data (before decoding)",
        },
    }


def _provenance(table: LabelTable, results: Sequence[_FileResult], salt: bytes) -> dict[str, Any]:
    """Return the manifest's provenance: tool versions and salted fingerprints only."""
    return {
        "tool": "medfed ingest",
        "pipeline_version": PIPELINE_VERSION,
        "pydicom": pydicom.__version__,
        "label_key": table.key,
        "labels_fingerprint": table.fingerprint,
        "source_fingerprint": hashlib.sha256(
            salt + "".join(sorted(r.content_hash for r in results)).encode()
        ).hexdigest(),
        "salt_id": hashlib.sha256(b"medfed-salt-id" + salt).hexdigest()[:16],
        "identifiers": "salted SHA-256 (per-site secret salt); no names, IDs, dates or paths",
    }


def _ingest(
    root: Path,
    table: LabelTable,
    out_dir: str | os.PathLike[str],
    opts: IngestOptions,
    salt: bytes,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None,
    t0: float,
) -> IngestReport:
    paths = discover_files(root)
    total = len(paths)
    log.info(
        "found %d files; ingesting with %d worker(s), %d MiB per-file budget",
        total,
        opts.workers,
        opts.file_budget // 1024**2,
    )
    results = _process_files(paths, opts, salt, cache_dir, progress)
    files = _sort_files(root, paths, results, table, salt)
    if not files.keep:
        reasons = Counter(q["reason"] for q in files.quarantine)
        raise DataError(
            f"no usable image among {total} files (quarantined: {dict(reasons)}); "
            "check the labels CSV key and that the directory holds image DICOM files"
        )
    splits, patients = _make_splits(files.keep, files.outcomes, opts)
    summary = _summary(files.outcomes, splits, patients, table, files.deid_report)
    manifest = write_site_dataset(
        out_dir,
        task=opts.task,
        label_names=table.label_names,
        splits=splits,
        preprocessing=_preprocessing(opts),
        provenance=_provenance(table, results, salt),
        quarantine=files.quarantine,
        summary=summary,
        overwrite=opts.overwrite,
    )
    seconds = time.perf_counter() - t0
    log.info(
        "ingested %d of %d files (%d samples) in %.1f s; %d quarantined",
        summary["ingested"],
        total,
        summary["samples"],
        seconds,
        summary["quarantined"],
    )
    return IngestReport(manifest=manifest, outcomes=files.outcomes, seconds=seconds)


def summarise_outcomes(outcomes: Sequence[FileOutcome]) -> Mapping[str, Counter[str]]:
    """Count files by outcome, modality and manufacturer (for the CLI's summary table)."""
    return {
        "outcome": Counter(o.reason or "ingested" for o in outcomes),
        "modality": Counter(o.modality or "unknown" for o in outcomes),
        "manufacturer": Counter(o.manufacturer or "unknown" for o in outcomes),
    }
