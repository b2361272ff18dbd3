"""Ingestion throughput and peak memory: ``medfed ingest`` against a plain pydicom loop.

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

``memory`` (issue 16, item 4): peak resident memory of ``medfed ingest``, each run in a
fresh child process (the ingest process's VmHWM, its largest worker's ``ru_maxrss``, and
the process tree's summed RSS sampled every 20 ms), with ``--workers`` workers and the
default per-file budget for them:

- ``corpus``: the real corpus;
- ``hostile``: files crafted from real corpus files with pydicom: NaN / 1e308 rescale
  slope, NaN window, a ~40 KB file declaring 65535 x 65535 x 10000 frames (native and
  RLE), a ~2 KB JPEG 2000 file whose 64 x 64 header hides a 16000 x 16000 codestream, a
  deflate bomb (a deflated data set of ~1 MB inflating to 1 GiB), a gzip bomb
  (~5 MB gunzipping to 1 GiB) and a ~1 MB gzipped 16384 x 16384 image (256 MiB of
  pixels); every one must end quarantined with its reason;
- ``near_budget``: one honest file per pixel path (grey 8/16 bit, big endian, RLE,
  gzipped, multi-frame, RGB, YBR, palette) declaring just under ``--near-budget-mib``,
  ingested alone: ``expansion`` = (peak - idle peak) / declared bytes, which must stay
  under ``client.data.dicom_read.PIPELINE_EXPANSION``.

The bound checked: every process's peak <= idle peak + ``PIPELINE_EXPANSION`` x budget.
``--baseline-tree DIR`` also runs the hostile set with the medfed source tree in DIR (an
older version, e.g. ``git archive`` of a commit) for a before/after comparison.

Usage: ``python bench/ingest.py [--workers N] [--repeats R] [--size S] [--skip-throughput]
[--near-budget-mib M] [--baseline-tree DIR]``
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
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from openjpeg.utils import encode as j2k_encode
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from client.data.dicom_read import (
    PIPELINE_EXPANSION,
    Preprocessing,
    declared_pixel_bytes,
    default_file_budget,
    discover_files,
    parse_dataset,
    quiet_pydicom_logs,
)
from client.data.ingest import IngestOptions, ingest

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2

#: Runs ``medfed ingest`` in a child process and writes its exit code and peak RSS.
#: The child's own peak is VmHWM (reset by exec), not ru_maxrss: Linux carries a forking
#: parent's peak over into the child's ru_maxrss across exec. Workers are forked by the
#: child after its exec, so RUSAGE_CHILDREN's ru_maxrss is theirs.
_RUNNER = r"""
import json, resource, sys
from pathlib import Path
out = Path(sys.argv[1])
sys.argv = ["medfed", *sys.argv[2:]]
from common.cli import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
hwm = next(
    int(line.split()[1])
    for line in Path("/proc/self/status").read_text().splitlines()
    if line.startswith("VmHWM:")
)
out.write_text(json.dumps({
    "exit_code": code,
    "main_kib": hwm,
    "largest_worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""

#: Real corpus files the crafted ones start from (relative to the corpus root).
_SOURCES = {
    "ct": "pydicom_3.0.2_test_files/CT_small.dcm",
    "rle_frames": "pydicom_data/emri_small_RLE.dcm",
    "big_endian": "pydicom_3.0.2_test_files/MR_small_bigendian.dcm",
    "rgb": "pydicom_3.0.2_test_files/examples_rgb_color.dcm",
    "ybr": "pydicom_data/SC_ybr_full_uncompressed.dcm",
    "palette": "pydicom_3.0.2_test_files/examples_palette.dcm",
    "j2k": "pydicom_3.0.2_test_files/MR_small_jp2klossless.dcm",
}


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


def write_path_labels(root: Path, labels: Path) -> list[Path]:
    """Write a ``path,label`` CSV for every file under ``root``; return the files."""
    paths = discover_files(root)
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i, p in enumerate(paths):
            w.writerow([p.relative_to(root).as_posix(), i % 2])
    return paths


# ------------------------------------------------------------------------- memory


def _tree_rss_kib(pid: int) -> int:
    """Summed VmRSS (KiB) of ``pid`` and its descendants, from ``/proc`` (0 if gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def run_ingest_child(
    export: Path,
    labels: Path,
    out: Path,
    cli_args: list[str],
    *,
    tree: Path | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Run ``medfed ingest`` in a fresh child; return its exit code, peaks (MiB), summary.

    ``tree``: run that medfed source tree instead of this one (``--baseline-tree``).
    A child still running after ``timeout_s`` seconds is killed (``timed_out``).
    """
    result = out.with_suffix(".rss.json")
    env = dict(os.environ)
    cwd = ROOT
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
        cwd = tree
    cmd = [sys.executable, "-c", _RUNNER, str(result), "ingest", str(export)]
    cmd += ["-l", str(labels), "-o", str(out), "--no-cache", "--force", *cli_args]
    peak_tree = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: a timeout stops its workers too
    )
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not done.is_set():
            peak_tree = max(peak_tree, _tree_rss_kib(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    rss = json.loads(result.read_text()) if result.is_file() else {}
    manifest = out / "manifest.json"
    summary = json.loads(manifest.read_text()) if manifest.is_file() else {}
    return {
        "exit_code": rss.get("exit_code", proc.returncode),
        "timed_out": timed_out,
        "seconds": round(seconds, 2),
        "peak_rss_mib": {
            "main": round(rss.get("main_kib", 0) / 1024, 1),
            "largest_worker": round(rss.get("largest_worker_kib", 0) / 1024, 1),
            "tree_sampled": round(peak_tree / 1024, 1),
        },
        "manifest": summary,
    }


def _save(ds: Dataset, path: Path, *, deflate: bool = False, gz: bool = False) -> None:
    if deflate:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb", compresslevel=1) as fh:
            ds.save_as(fh, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)


def build_hostile_set(src: Path, out: Path, work: Path) -> dict[str, str]:
    """Write the hostile files (crafted with pydicom from real files) under ``out``.

    Returns ``{file name: what it is}``. The large payloads are zeros: deflate and gzip
    shrink them about a thousandfold, which is what makes them bombs.
    """
    what: dict[str, str] = {}

    def ct() -> Dataset:
        return pydicom.dcmread(src / _SOURCES["ct"])

    def add(name: str, ds: Dataset, desc: str, **kw: bool) -> None:
        _save(ds, out / name, **kw)
        what[name] = desc

    add("good.dcm", ct(), "the real CT file, unchanged")
    d = ct()
    d.RescaleSlope = "NaN"
    add("nan_slope.dcm", d, "RescaleSlope NaN")
    d = ct()
    d.RescaleSlope = "1e308"
    add("huge_slope.dcm", d, "RescaleSlope 1e308")
    d = ct()
    d.WindowCenter, d.WindowWidth = "NaN", "NaN"
    add("nan_window.dcm", d, "WindowCenter and WindowWidth NaN")
    d = ct()
    d.Rows = d.Columns = 65535
    d.NumberOfFrames = 10000
    add("declares_huge.dcm", d, "native; declares 65535 x 65535 x 10000 frames")
    d = pydicom.dcmread(src / _SOURCES["rle_frames"])
    d.Rows = d.Columns = 65535
    d.NumberOfFrames = 10000
    add("declares_huge_rle.dcm", d, "RLE; declares 65535 x 65535 x 10000 frames")
    d = pydicom.dcmread(src / _SOURCES["j2k"])
    d.PixelData = encapsulate([j2k_encode(np.zeros((16000, 16000), dtype=np.uint8))])
    add("j2k_bomb.dcm", d, "64 x 64 JPEG 2000 header, 16000 x 16000 codestream")
    d = ct()
    d.DataSetTrailingPadding = bytes(1024 * MIB)  # pydicom deflates it all in memory
    add("deflate_bomb.dcm", d, "deflated data set inflating to 1 GiB", deflate=True)
    del d
    d = ct()
    d.Rows = d.Columns = 16384
    d.BitsAllocated, d.BitsStored, d.HighBit, d.PixelRepresentation = 8, 8, 7, 0
    d.PixelData = bytes(16384 * 16384)
    add("huge_image.dcm.gz", d, "gzipped 16384 x 16384 8-bit image (256 MiB)", gz=True)
    zeros = work / "zeros.bin"
    with zeros.open("wb") as sparse:  # 1 GiB on paper, streamed by pydicom
        sparse.truncate(1024 * MIB)
    with zeros.open("rb") as payload:
        d = ct()
        d.DataSetTrailingPadding = payload
        add("gzip_bomb.gz", d, "gzipped file with 1 GiB of trailing padding", gz=True)
    zeros.unlink()
    return what


def build_near_budget_set(src: Path, out: Path, budget: int) -> dict[str, int]:
    """One honest file per pixel path declaring just under ``budget`` bytes.

    Returns ``{file name: declared_pixel_bytes}``.
    """
    rng = np.random.default_rng(0)
    target = int(0.9 * budget)
    made: dict[str, int] = {}

    def grey(name: str, source: str, dtype: str, *, gz: bool = False, rle: bool = False) -> None:
        d = pydicom.dcmread(src / _SOURCES[source])
        n = int((target / 4) ** 0.5) // 2 * 2
        d.Rows = d.Columns = n
        d.pop("NumberOfFrames", None)
        bits = np.dtype(dtype).itemsize * 8
        d.BitsAllocated, d.BitsStored, d.HighBit = bits, bits, bits - 1
        d.PixelRepresentation = 0
        d.PixelData = rng.integers(0, 2 ** min(bits, 12), (n, n)).astype(dtype).tobytes()
        if rle:
            d.compress(RLELossless, encoding_plugin="pydicom")
        _save(d, out / name, gz=gz)

    grey("grey16.dcm", "ct", "<u2")
    grey("grey8.dcm", "ct", "u1")
    grey("grey16_big_endian.dcm", "big_endian", ">u2")
    grey("grey16_rle.dcm", "ct", "<u2", rle=True)
    grey("grey16.dcm.gz", "ct", "<u2", gz=True)
    d = pydicom.dcmread(src / _SOURCES["ct"])
    frames = target // (4 * 256 * 256)
    d.Rows = d.Columns = 256
    d.NumberOfFrames = frames
    d.PixelData = rng.integers(-1000, 1000, (frames, 256, 256)).astype("<i2").tobytes()
    _save(d, out / "grey16_frames.dcm")
    for name, source in (("rgb8.dcm", "rgb"), ("ybr8.dcm", "ybr"), ("palette8.dcm", "palette")):
        d = pydicom.dcmread(src / _SOURCES[source])
        n = int((target / 12) ** 0.5) // 2 * 2
        d.Rows = d.Columns = n
        samples = int(d.SamplesPerPixel)
        d.PixelData = rng.integers(0, 255, (n, n, samples)).astype("u1").tobytes()
        _save(d, out / name)
    for p in sorted(out.iterdir()):
        data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        made[p.name] = declared_pixel_bytes(parse_dataset(data))
    return made


def _outcomes(export: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """``{file name: reason or "ingested"}`` from a manifest's numbered quarantine list."""
    names = [p.relative_to(export).as_posix() for p in discover_files(export)]
    out = dict.fromkeys(names, "ingested")
    for q in manifest.get("quarantine", []):
        out[names[int(q["file"]) - 1]] = q["reason"]
    return out


def measure_memory(
    src: Path, work: Path, *, workers: int, near_budget_mib: int, baseline_tree: Path | None
) -> dict[str, Any]:
    """Peak RSS of ``medfed ingest`` on the corpus, the hostile set and near-budget files."""
    budget = default_file_budget(workers)
    cli = ["--workers", str(workers), "--size", "28"]
    # idle: the same code path on one small real file, in one process
    idle_dir = work / "idle"
    idle_dir.mkdir()
    shutil.copy(src / _SOURCES["ct"], idle_dir / "ct.dcm")
    write_path_labels(idle_dir, work / "idle.csv")
    idle = run_ingest_child(idle_dir, work / "idle.csv", work / "site-idle", ["--workers", "1"])
    idle_mib = idle["peak_rss_mib"]["main"]
    bound = idle_mib + PIPELINE_EXPANSION * budget / MIB

    def peaks_ok(run: dict[str, Any], limit: float) -> bool:
        peaks: dict[str, float] = run["peak_rss_mib"]
        return peaks["main"] <= limit and peaks["largest_worker"] <= limit

    corpus_labels = work / "corpus.csv"
    write_path_labels(src, corpus_labels)
    corpus = run_ingest_child(src, corpus_labels, work / "site-corpus", cli)
    corpus_summary = corpus.pop("manifest").get("summary", {})

    hostile_dir = work / "hostile"
    what = build_hostile_set(src, hostile_dir, work)
    write_path_labels(hostile_dir, work / "hostile.csv")
    hostile = run_ingest_child(hostile_dir, work / "hostile.csv", work / "site-hostile", cli)
    reasons = _outcomes(hostile_dir, hostile.pop("manifest"))
    expected_reason = {
        "good.dcm": "ingested",
        "nan_slope.dcm": "bad_lut",
        "huge_slope.dcm": "bad_lut",
        "nan_window.dcm": "bad_lut",
    }
    hostile_files = {
        name: {
            "what": desc,
            "bytes_on_disk": (hostile_dir / name).stat().st_size,
            "outcome": reasons.get(name, "?"),
        }
        for name, desc in what.items()
    }
    all_right = all(
        f["outcome"] == expected_reason.get(name, "too_large") for name, f in hostile_files.items()
    )
    result: dict[str, Any] = {
        "method": "peak RSS of a fresh `medfed ingest` child (main: VmHWM) and of its "
        "largest worker (ru_maxrss); tree_sampled = summed VmRSS of the process tree every "
        "20 ms (pages shared by forked workers counted in each)",
        "workers": workers,
        "budget_mib": budget // MIB,
        "pipeline_expansion": PIPELINE_EXPANSION,
        "idle_peak_rss_mib": idle_mib,
        "bound_per_process_mib": round(bound, 1),
        "corpus": {
            "files": corpus_summary.get("files"),
            "by_outcome": corpus_summary.get("by_outcome"),
            **corpus,
            "under_bound": peaks_ok(corpus, bound),
        },
        "hostile": {
            "files": hostile_files,
            "every_file_quarantined_with_its_reason": all_right,
            **hostile,
            "under_bound": peaks_ok(hostile, bound),
        },
    }
    if baseline_tree is not None:
        # The same hostile set and options, with an older medfed tree.
        before = run_ingest_child(
            hostile_dir, work / "hostile.csv", work / "site-before", cli, tree=baseline_tree
        )
        before_reasons = _outcomes(hostile_dir, before.pop("manifest"))
        result["hostile_with_baseline_tree"] = {
            "tree": str(baseline_tree),
            "outcomes": before_reasons,
            **before,
        }
    shutil.rmtree(hostile_dir)

    near_dir = work / "near"
    near_dir.mkdir()
    near_budget = near_budget_mib * MIB
    declared = build_near_budget_set(src, near_dir, near_budget)
    near: dict[str, Any] = {}
    for name, nbytes in declared.items():
        one = work / f"one-{name}"
        one.mkdir()
        shutil.move(near_dir / name, one / name)
        write_path_labels(one, work / f"one-{name}.csv")
        run = run_ingest_child(
            one,
            work / f"one-{name}.csv",
            work / f"site-one-{name}",
            ["--workers", "1", "--max-file-mib", str(near_budget_mib)],
        )
        outcome = _outcomes(one, run["manifest"]).get(name, "?")
        peak = run["peak_rss_mib"]["main"]
        near[name] = {
            "declared_mib": round(nbytes / MIB, 1),
            "outcome": outcome,
            "peak_rss_mib": peak,
            "expansion": round((peak - idle_mib) / (nbytes / MIB), 2),
        }
        shutil.rmtree(one)
    max_expansion = max(v["expansion"] for v in near.values())
    result["near_budget"] = {
        "budget_mib": near_budget_mib,
        "files": near,
        "max_expansion": max_expansion,
        "all_ingested": all(v["outcome"] == "ingested" for v in near.values()),
        "under_bound": max_expansion <= PIPELINE_EXPANSION,
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    ap.add_argument("--skip-throughput", action="store_true", help="only the memory measurements")
    ap.add_argument("--near-budget-mib", type=int, default=64)
    ap.add_argument("--baseline-tree", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    src = data_dir()
    work = Path(tempfile.mkdtemp(prefix="medfed-bench-ingest-"))
    try:
        result: dict[str, Any] = {"benchmark": "ingest"}
        if not args.skip_throughput:
            result |= measure_throughput(src, work, args)
        result["memory"] = measure_memory(
            src,
            work,
            workers=args.workers,
            near_budget_mib=args.near_budget_mib,
            baseline_tree=args.baseline_tree,
        )
        result |= {
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


def measure_throughput(src: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Files/s of the plain loop and of cold and cached ingests (see the module docstring)."""
    labels = work / "labels.csv"
    paths = write_path_labels(src, labels)
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
    return {
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
    }


if __name__ == "__main__":
    main()
