"""Ingestion throughput: ``medfed ingest`` against a plain pydicom loop, in one run.

Measures, on the shared DICOM corpus (``$MEDFED_DATA_DIR/dicom``, default
``<project>/../shared/data/dicom``):

- ``plain``: ``pydicom.dcmread(path, force=True)`` + ``ds.pixel_array`` per file (through
  ``gzip.open`` for gzipped files), errors swallowed: what a minimal script would do, with
  no LUTs, no resize, no hashing, no checks and no output;
- ``cold``: :func:`client.data.ingest.ingest` with an empty cache (discovery, hashing,
  de-identification check, decode, LUTs, resize, cache write, site dataset write);
- ``cached``: the same ingest again, every file served from the cache.

Writes ``bench/results/ingest.json`` with files/s of each and the ratios
``cold / plain`` (target >= 0.8) and ``cached / cold`` speed-up (target >= 10).
Each measurement is the best of ``--repeats`` runs (page cache warm for all).

Usage: ``python bench/ingest.py [--workers N] [--repeats R] [--size S]``
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pydicom

from client.data.dicom_read import Preprocessing, discover_files
from client.data.ingest import IngestOptions, ingest

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    env = os.environ.get("MEDFED_DATA_DIR")
    base = Path(env) if env else ROOT.parent / "shared" / "data"
    path = base / "dicom"
    if not path.is_dir():
        raise SystemExit(f"DICOM corpus not found at {path}; set MEDFED_DATA_DIR")
    return path


def plain_loop(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            try:
                with p.open("rb") as fh:
                    gz = fh.read(2) == b"\x1f\x8b"
                # Same files as ingest, gzipped ones included (pydicom reads a GzipFile).
                ds = pydicom.dcmread(gzip.open(p) if gz else p, force=True)
                _ = ds.pixel_array
            except Exception:
                pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    src = data_dir()
    paths = discover_files(src)
    work = Path(tempfile.mkdtemp(prefix="medfed-bench-ingest-"))
    try:
        labels = work / "labels.csv"
        with labels.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label"])
            for i, p in enumerate(paths):
                w.writerow([p.relative_to(src).as_posix(), i % 2])

        plain_loop(paths)  # warm the page cache and lazy imports
        plain = min(plain_loop(paths) for _ in range(args.repeats))

        prep = Preprocessing(size=args.size)
        cold_times, cached_times = [], []
        report = None
        for r in range(args.repeats):
            cache = work / f"cache{r}"
            opts = IngestOptions(
                prep=prep, cache_dir=cache, salt_file=work / "salt", workers=args.workers,
                overwrite=True,
            )
            t0 = time.perf_counter()
            report = ingest(src, labels, work / "site", options=opts)
            cold_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ingest(src, labels, work / "site", options=opts)
            cached_times.append(time.perf_counter() - t0)
        cold, cached = min(cold_times), min(cached_times)
        assert report is not None
        n = len(paths)
        result = {
            "benchmark": "ingest",
            "files": n,
            "ingested": report.ingested,
            "quarantined": report.quarantined,
            "samples": int(report.manifest["summary"]["samples"]),
            "workers": args.workers,
            "size": args.size,
            "repeats": args.repeats,
            "plain_loop_files_per_s": n / plain,
            "ingest_cold_files_per_s": n / cold,
            "ingest_cached_files_per_s": n / cached,
            "ratio_cold_vs_plain": plain / cold,
            "speedup_cached_vs_cold": cold / cached,
            "targets": {"ratio_cold_vs_plain": 0.8, "speedup_cached_vs_cold": 10.0},
            "seconds": {"plain": plain, "cold": cold, "cached": cached},
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "pydicom": pydicom.__version__,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
