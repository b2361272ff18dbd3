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
``cold / plain`` (target >= 0.8) and ``cached / cold`` speed-up (target >= 10). The
headline figures use one worker process (like for like with the single-process plain
loop); ``by_workers`` adds ``--workers`` processes. Each figure is the best of
``--repeats`` interleaved runs (page cache warm for all). The machine's 1-minute load
average is recorded: on a shared machine the figures move with it.

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

from client.data.dicom_read import Preprocessing, discover_files, quiet_pydicom_logs
from client.data.ingest import IngestOptions, ingest

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    env = os.environ.get("MEDFED_DATA_DIR")
    base = Path(env) if env else ROOT.parent / "shared" / "data"
    path = base / "dicom"
    if not path.is_dir():
        raise SystemExit(f"DICOM corpus not found at {path}; set MEDFED_DATA_DIR")
    return path


def plain_loop(paths: list[Path]) -> tuple[float, float]:
    """Return (wall seconds, CPU seconds of this process) for the plain loop."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    with warnings.catch_warnings(), quiet_pydicom_logs():
        warnings.simplefilter("ignore")
        for p in paths:
            try:
                with p.open("rb") as fh:
                    gz = fh.read(2) == b"\x1f\x8b"
                # Same files as ingest, gzipped ones included (pydicom reads a GzipFile).
                if gz:
                    with gzip.open(p) as fh:
                        ds = pydicom.dcmread(fh, force=True)
                else:
                    ds = pydicom.dcmread(p, force=True)
                _ = ds.pixel_array
            except Exception:
                pass
    return time.perf_counter() - t0, time.process_time() - c0


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
        prep = Preprocessing(size=args.size)
        worker_counts = sorted({1, args.workers})
        plain_times: list[float] = []
        plain_cpu: list[float] = []
        cold_cpu: list[float] = []  # one worker only: pool children are not counted
        cold_times: dict[int, list[float]] = {w: [] for w in worker_counts}
        cached_times: dict[int, list[float]] = {w: [] for w in worker_counts}
        report = None
        # Interleaved, so that load from other processes hits every variant alike.
        for r in range(args.repeats):
            wall, cpu = plain_loop(paths)
            plain_times.append(wall)
            plain_cpu.append(cpu)
            for workers in worker_counts:
                opts = IngestOptions(
                    prep=prep,
                    cache_dir=work / f"cache-w{workers}-{r}",
                    salt_file=work / "salt",
                    workers=workers,
                    overwrite=True,
                )
                c0 = time.process_time()
                t0 = time.perf_counter()
                report = ingest(src, labels, work / "site", options=opts)
                cold_times[workers].append(time.perf_counter() - t0)
                if workers == 1:
                    cold_cpu.append(time.process_time() - c0)
                t0 = time.perf_counter()
                ingest(src, labels, work / "site", options=opts)
                cached_times[workers].append(time.perf_counter() - t0)
        plain = min(plain_times)
        runs = []
        for workers in worker_counts:
            cold, cached = min(cold_times[workers]), min(cached_times[workers])
            runs.append(
                {
                    "workers": workers,
                    "ingest_cold_files_per_s": len(paths) / cold,
                    "ingest_cached_files_per_s": len(paths) / cached,
                    "ratio_cold_vs_plain": plain / cold,
                    "speedup_cached_vs_cold": cold / cached,
                    "seconds": {"cold": cold, "cached": cached},
                }
            )
        if report is None:
            raise SystemExit("--repeats must be >= 1")
        n = len(paths)
        best = runs[0]  # one worker process: like for like with the single-process loop
        result = {
            "benchmark": "ingest",
            "files": n,
            "ingested": report.ingested,
            "quarantined": report.quarantined,
            "samples": int(report.manifest["summary"]["samples"]),
            "size": args.size,
            "repeats": args.repeats,
            "plain_loop_files_per_s": n / plain,
            "plain_loop_seconds": plain,
            # CPU time is less sensitive than wall time to other processes' load.
            "cpu_seconds_one_worker": {"plain": min(plain_cpu), "cold": min(cold_cpu)},
            "ratio_cold_vs_plain_cpu": min(plain_cpu) / min(cold_cpu),
            "workers": best["workers"],
            "ingest_cold_files_per_s": best["ingest_cold_files_per_s"],
            "ingest_cached_files_per_s": best["ingest_cached_files_per_s"],
            "ratio_cold_vs_plain": best["ratio_cold_vs_plain"],
            "speedup_cached_vs_cold": best["speedup_cached_vs_cold"],
            "targets": {"ratio_cold_vs_plain": 0.8, "speedup_cached_vs_cold": 10.0},
            "by_workers": runs,
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
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
