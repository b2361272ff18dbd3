"""Hostile DICOM files (issue 16, items 3 and 4): poisoned LUTs and resource exhaustion.

Every crafted file is a real file of the shared corpus (a CT image, or a JPEG 2000 one,
picked through INVENTORY.json) with elements changed by pydicom, run through the real
``read_dicom`` / ``ingest`` / ``medfed ingest``: each must be quarantined with its reason,
before its pixels are decoded where the header alone shows the problem. Memory is checked
by behaviour (the decoder is never reached; tracemalloc's peak while a bomb is read stays
below the budget, far below what it would inflate to), never by timings. Training on a
site dataset holding a NaN image must be refused before the privacy ledger is charged.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import threading
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from typer.testing import CliRunner

import client.data.dicom_read as dicom_read
from client.data.dicom_read import (
    ByteBudget,
    Preprocessing,
    Reason,
    UnusableInputError,
    default_file_budget,
    inflated_size,
    load_bytes,
    parse_dataset,
    read_dicom,
)
from client.data.ingest import IngestOptions, IngestReport, ingest
from client.privacy import PrivacyLedger, ledger_key
from client.site import handlers
from client.site.handlers import prepare, train_content
from client.site.simulated import research_policy
from common.errors import DataError
from common.models import get_model
from common.records import state_to_record
from common.site_dataset import SiteDataset
from tests.sites import tiny_site

MIB = 1024**2


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ct_file(shared_data_dir: Path) -> Path:
    """A small, normal, uncompressed single-frame CT image of the real corpus."""
    root = shared_data_dir / "dicom"
    inventory = root / "INVENTORY.json"
    if not inventory.is_file():
        pytest.fail(f"{inventory} missing from the shared data")
    entries = [
        e
        for e in json.loads(inventory.read_text())
        if e.get("mod") == "CT"
        and e.get("ts") == "Explicit VR Little Endian"
        and str(e.get("px", "")).startswith("ok")
        and e.get("frames") == 1
        and int(str(e.get("rc", "0x0")).split("x")[0]) >= 64
        and not e["file"].endswith(".gz")
    ]
    if not entries:
        pytest.fail("INVENTORY.json lists no plain CT image")
    chosen: str = min(entries, key=lambda e: (e["size"], e["file"]))["file"]
    return root / chosen


def crafted(src: Path, **elements: Any) -> Dataset:
    """The real file with ``elements`` (keyword -> value) set by pydicom."""
    ds = pydicom.dcmread(src)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset, *, deflate: bool = False) -> bytes:
    if deflate:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def with_padding(ds: Dataset, nbytes: int) -> Dataset:
    """Add ``nbytes`` zero bytes of Data Set Trailing Padding (FFFC,FFFC): a bomb payload."""
    ds.DataSetTrailingPadding = bytes(nbytes)
    return ds


def gzip_bomb(data: bytes, zeros: int) -> bytes:
    """``data`` followed by ``zeros`` zero bytes, gzipped in a stream (never all in memory)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        gz.write(data)
        chunk = bytes(4 * MIB)
        for _ in range(zeros // len(chunk)):
            gz.write(chunk)
    return buf.getvalue()


def ingest_files(tmp_path: Path, files: dict[str, bytes], **options: Any) -> IngestReport:
    """Write ``files`` (name -> bytes) and ``medfed ingest`` them (path labels)."""
    root = tmp_path / "export"
    root.mkdir()
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i, (name, data) in enumerate(files.items()):
            (root / name).write_bytes(data)
            w.writerow([name, i % 2])
    opts = IngestOptions(
        prep=Preprocessing(size=16), cache_dir=tmp_path / "cache", val_fraction=0.0, **options
    )
    return ingest(root, labels, tmp_path / "site", options=opts)


def reasons(report: IngestReport) -> dict[str, str | None]:
    return {o.rel_path: o.reason for o in report.outcomes}


@pytest.fixture
def no_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reaching the pixel decoder a test failure."""

    def fail(ds: Dataset) -> np.ndarray:
        raise AssertionError("the pixel decoder was reached")

    monkeypatch.setattr(dicom_read, "_decode", fail)


# --------------------------------------------------------- item 3: poisoned pixels


@pytest.mark.parametrize(
    "elements",
    [
        {"RescaleSlope": "NaN"},
        {"RescaleSlope": "1e308"},
        {"RescaleIntercept": "-inf"},
        {"RescaleSlope": "0"},
        {"WindowCenter": "NaN", "WindowWidth": "NaN"},
        {"WindowCenter": "40", "WindowWidth": "NaN"},
        {"WindowCenter": "1e300", "WindowWidth": "400"},
    ],
    ids=[
        "slope-nan",
        "slope-1e308",
        "intercept-inf",
        "slope-0",
        "window-nan",
        "width-nan",
        "center-1e300",
    ],
)
def test_poisoned_lut_is_bad_lut_before_decoding(
    ct_file: Path, elements: dict[str, str], no_decode: None
) -> None:
    # Prepare: the real CT file with one poisoned LUT parameter
    poisoned = to_bytes(crafted(ct_file, **elements))
    # Execute (bad_lut is decided from the header: the decoder is never reached)
    with pytest.raises(UnusableInputError) as info:
        read_dicom(poisoned, Preprocessing(size=16))
    # Assert: the reason, naming the attribute but never quoting its value
    assert info.value.reason is Reason.BAD_LUT
    assert next(iter(elements)) in info.value.detail or "Window" in info.value.detail
    assert not any(v in str(info.value) for v in ("NaN", "1e3", "inf"))


@pytest.mark.parametrize("elements", [{"RescaleSlope": "NaN"}, {"WindowWidth": "NaN"}])
def test_ingest_quarantines_nan_luts_as_bad_lut(
    tmp_path: Path, ct_file: Path, elements: dict[str, str]
) -> None:
    # Prepare
    files = {
        "good.dcm": ct_file.read_bytes(),
        "poisoned.dcm": to_bytes(crafted(ct_file, WindowCenter="40", **elements)),
    }
    # Execute
    report = ingest_files(tmp_path, files)
    # Assert
    assert reasons(report) == {"good.dcm": None, "poisoned.dcm": Reason.BAD_LUT.value}
    images = SiteDataset(tmp_path / "site").load("train").images
    assert images.shape[0] == 1 and np.isfinite(images).all()
    quarantine = json.loads((tmp_path / "site" / "manifest.json").read_text())["quarantine"]
    assert [q["reason"] for q in quarantine] == [Reason.BAD_LUT.value]


@pytest.mark.parametrize(
    "prep",
    [Preprocessing(size=16, window=(40.0, 400.0)), Preprocessing(size=16, intensity="minmax")],
    ids=["own-window", "minmax"],
)
def test_a_nan_window_that_the_pipeline_does_not_use_is_no_reason_to_quarantine(
    ct_file: Path, prep: Preprocessing
) -> None:
    data = to_bytes(crafted(ct_file, WindowCenter="NaN", WindowWidth="NaN"))
    pixels = read_dicom(data, prep).pixels
    assert np.isfinite(pixels).all() and pixels.max() > 0


def test_a_non_finite_result_is_quarantined_whatever_produced_it(
    ct_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a LUT step that yields NaN although every header value is sane
    from pydicom.pixels.processing import apply_modality_lut as real

    def nan_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
        out = np.asarray(real(arr, ds), dtype=np.float64)
        return np.where(out == out.max(), np.nan, out)

    monkeypatch.setattr(dicom_read, "apply_modality_lut", nan_lut)
    # Execute
    with pytest.raises(UnusableInputError) as info:
        read_dicom(ct_file.read_bytes(), Preprocessing(size=16))
    # Assert
    assert info.value.reason is Reason.NON_FINITE_PIXELS


def test_a_window_option_that_is_not_finite_is_a_config_error() -> None:
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="window"):
        Preprocessing(window=(float("nan"), 400.0))
    with pytest.raises(ConfigError, match="window"):
        Preprocessing.with_window("40,nan")


def _dp_context(site: Path) -> Context:
    return Context(
        run_id=7,
        node_id=1,
        node_config={"state-dir": str(site.parent / "state"), "dataset-dir": str(site)},
        state=RecordDict(),
        run_config={"batch-size": 8, "seed": 42, "dp.enabled": True, "dp.noise-multiplier": 1.0},
    )


def _content() -> RecordDict:
    torch.manual_seed(0)
    return RecordDict(
        {
            "arrays": state_to_record(get_model("cnn")),
            "config": ConfigRecord({"server-round": 1}),
        }
    )


def test_training_refuses_a_nan_image_before_any_dp_step_is_charged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a site dataset written by an older medfed, with one all-NaN training image,
    # and a DP round; the DP engine is spied on (it still runs if reached)
    site = tiny_site(tmp_path / "site", train=24, val=8)
    arr = np.load(site / "train_images.npy", mmap_mode="r+")
    arr[5] = np.nan
    arr.flush()
    del arr
    job = prepare(_content(), _dp_context(site), policy=research_policy())
    key = ledger_key(job.data.fingerprint)
    reached: list[str] = []
    from client.privacy import private_training as real_private_training

    def spy(**kwargs: Any) -> Any:
        reached.append("private_training")
        return real_private_training(**kwargs)

    monkeypatch.setattr(handlers, "private_training", spy)
    # Execute
    with pytest.raises(DataError, match="Re-ingest") as info:
        train_content(job)
    # Assert: a clear refusal (a count, no value), the DP engine never reached, and the
    # site's ledger not charged
    assert "1 of 24 training images" in str(info.value)
    assert reached == []
    assert PrivacyLedger(job.node.resolve_state_dir(job.run)).entry(key).get("history", []) == []


# ------------------------------------------------------------- item 4: exhaustion


def test_default_budget_is_derived_from_the_worker_count() -> None:
    budgets = {w: default_file_budget(w) for w in (1, 2, 4, 8)}
    assert budgets[1] > budgets[2] > budgets[4] > budgets[8] >= 64 * MIB
    for workers, budget in budgets.items():
        # all workers' worst-case pipelines together fit in a third of a 24 GB site
        assert workers * budget * dicom_read.PIPELINE_EXPANSION <= 8 * 1000**3
    assert IngestOptions(workers=2).file_budget == budgets[2]
    assert IngestOptions(workers=2, max_file_bytes=8 * MIB).file_budget == 8 * MIB


def test_huge_declared_pixel_data_is_too_large_before_decoding(
    ct_file: Path, no_decode: None
) -> None:
    # Prepare: a ~40 KB file declaring 65535 x 65535 x 10000 16-bit frames (~80 TiB)
    data = to_bytes(crafted(ct_file, Rows=65535, Columns=65535, NumberOfFrames=10000))
    assert len(data) < 100_000
    # Execute: the default budget, no decoder, and a small traced peak
    tracemalloc.start()
    try:
        with pytest.raises(UnusableInputError) as info:
            read_dicom(data, Preprocessing(size=16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Assert
    assert info.value.reason is Reason.TOO_LARGE
    assert "declared pixel data" in info.value.detail
    assert peak < 4 * MIB


def test_a_codestream_larger_than_its_header_is_too_large_before_decoding(
    shared_data_dir: Path, no_decode: None
) -> None:
    # Prepare: a real JPEG 2000 file (64 x 64 in its header) whose codestream is replaced
    # by one of 4096 x 4096: the decoder would allocate for the codestream's size
    from openjpeg.utils import encode
    from pydicom.encaps import encapsulate

    root = shared_data_dir / "dicom"
    entry = next(
        e
        for e in json.loads((root / "INVENTORY.json").read_text())
        if e.get("ts") == "JPEG 2000 Image Compression (Lossless Only)"
        and e.get("rc") == "64x64"
        and e.get("frames") == 1
        and str(e.get("px", "")).startswith("ok")
    )
    ds = pydicom.dcmread(root / entry["file"])
    ds.PixelData = encapsulate([encode(np.zeros((4096, 4096), dtype=np.uint16))])
    data = to_bytes(ds)
    assert len(data) < 10_000
    # Execute
    with pytest.raises(UnusableInputError) as info:
        read_dicom(data, Preprocessing(size=16))
    # Assert
    assert info.value.reason is Reason.TOO_LARGE
    assert "codestream" in info.value.detail


def test_an_honest_image_over_the_budget_is_too_large_in_ingest(
    tmp_path: Path, ct_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: 1024 x 1024 x 4 frames of 16 bits really present (8 MiB; 16 MiB as float32),
    # gzipped to a few KB, a budget of 12 MiB that the gunzipped file fits, and the real
    # CT file; the decoder is spied on
    big = crafted(ct_file, Rows=1024, Columns=1024, NumberOfFrames=4)
    big.PixelData = bytes(1024 * 1024 * 4 * 2)
    files = {
        "big.dcm.gz": gzip.compress(to_bytes(big), compresslevel=1),
        "good.dcm": ct_file.read_bytes(),
    }
    decoded = tmp_path / "decoded-rows.txt"  # a file: decoding runs in worker processes
    real_decode = dicom_read._decode

    def spy(ds: Dataset) -> np.ndarray:
        with decoded.open("a") as fh:
            fh.write(f"{int(ds.Rows)}\n")
        return real_decode(ds)

    monkeypatch.setattr(dicom_read, "_decode", spy)  # inherited by the forked workers
    # Execute
    report = ingest_files(tmp_path, files, max_file_bytes=12 * MIB)
    # Assert: the big file is refused from its header; only the good one is decoded
    outcome = {o.rel_path: (o.reason, o.detail) for o in report.outcomes}
    assert outcome == {
        "big.dcm.gz": (Reason.TOO_LARGE.value, "declared pixel data over the per-file budget"),
        "good.dcm": (None, ""),
    }
    assert decoded.read_text().split() == [str(int(pydicom.dcmread(ct_file).Rows))]


def _refused_with_peak(fn: Any) -> tuple[Any, int]:
    """Run ``fn``, which must raise :class:`UnusableInputError`; the error and the peak
    bytes Python allocated meanwhile (tracemalloc)."""
    tracemalloc.start()
    try:
        with pytest.raises(UnusableInputError) as info:
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return info, peak


def test_deflate_bomb_is_too_large_without_inflating_it(ct_file: Path) -> None:
    # Prepare: a normal image whose deflated data set inflates to 32 MiB
    bomb = to_bytes(with_padding(crafted(ct_file), 32 * MIB), deflate=True)
    assert len(bomb) < MIB
    budget = ByteBudget(limit=4 * MIB)
    # Execute
    info, peak = _refused_with_peak(lambda: parse_dataset(bomb, budget=budget))
    # Assert: refused while measuring; pydicom never inflated it
    assert info.value.reason is Reason.TOO_LARGE
    assert "inflated" in info.value.detail
    assert peak < budget.limit  # measured in 1 MiB pieces, thrown away: 32 MiB never exist


def _within(seconds: float, fn: Any) -> list[Any]:
    """Run ``fn`` in a daemon thread; its result in a list, empty if still running."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    return result


def test_inflated_size_counts_streams_with_bytes_after_their_end() -> None:
    # Prepare: DICOM pads a deflated data set to an even length, leaving one byte after
    # the stream's end; gzip files may hold several members
    payload = bytes(3 * MIB) + np.random.default_rng(0).bytes(MIB)
    comp = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = comp.compress(payload) + comp.flush() + b"\x00"
    members = gzip.compress(payload) + gzip.compress(payload[:1000])
    # Execute + Assert (in a thread: a regression would loop forever)
    assert _within(10, lambda: inflated_size(raw, limit=8 * MIB)) == [len(payload)]
    assert _within(10, lambda: inflated_size(members, limit=8 * MIB, container="gzip")) == [
        len(payload) + 1000
    ]
    assert _within(10, lambda: inflated_size(raw, limit=MIB)) == [MIB + MIB]  # stops early


def test_a_deflated_file_within_the_budget_still_parses(ct_file: Path) -> None:
    data = to_bytes(crafted(ct_file), deflate=True)
    image = read_dicom(data, Preprocessing(size=16), budget=ByteBudget(limit=4 * MIB))
    assert image.transfer_syntax == "Deflated Explicit VR Little Endian"
    assert np.isfinite(image.pixels).all()


def test_gzip_bomb_is_too_large_and_decompresses_no_more_than_the_budget(
    tmp_path: Path, ct_file: Path
) -> None:
    # Prepare: a real file followed by 64 MiB of zeros, gzipped (~100 KB)
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip_bomb(ct_file.read_bytes(), 64 * MIB))
    # Execute
    budget = ByteBudget(limit=4 * MIB)
    info, peak = _refused_with_peak(lambda: load_bytes(path, budget=budget))
    # Assert: measured in 1 MiB pieces, thrown away: the 64 MiB never exist
    assert info.value.reason is Reason.TOO_LARGE
    assert "gunzipped" in info.value.detail
    assert peak < budget.limit


def test_a_file_over_the_budget_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "huge"
    with path.open("wb") as fh:  # sparse: 2 MiB on paper, nothing on disk
        fh.truncate(2 * MIB)
    budget = ByteBudget(limit=MIB)
    with pytest.raises(UnusableInputError) as info:
        load_bytes(path, budget=budget)
    assert info.value.reason is Reason.TOO_LARGE and budget.largest == 2 * MIB


def test_cli_ingest_quarantines_every_hostile_file_with_its_reason(
    tmp_path: Path, ct_file: Path
) -> None:
    import typer

    from client.cli import register

    # Prepare: one good file and one of each hostile kind
    files = {
        "good.dcm": ct_file.read_bytes(),
        "nan_slope.dcm": to_bytes(crafted(ct_file, RescaleSlope="NaN")),
        "huge_slope.dcm": to_bytes(crafted(ct_file, RescaleSlope="1e308")),
        "nan_window.dcm": to_bytes(crafted(ct_file, WindowCenter="NaN", WindowWidth="NaN")),
        "declares_huge": to_bytes(
            crafted(ct_file, Rows=65535, Columns=65535, NumberOfFrames=10000)
        ),
        "deflate_bomb.dcm": to_bytes(with_padding(crafted(ct_file), 16 * MIB), deflate=True),
        "gzip_bomb.gz": gzip_bomb(ct_file.read_bytes(), 16 * MIB),
    }
    root = tmp_path / "export"
    root.mkdir()
    rows = [["path", "label"]]
    for i, (name, data) in enumerate(files.items()):
        (root / name).write_bytes(data)
        rows.append([name, str(i % 2)])
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(",".join(r) for r in rows) + "\n")
    app = typer.Typer()
    register(app)
    out = tmp_path / "site"
    args = ["ingest", str(root), "-l", str(labels), "-o", str(out), "--size", "16"]
    # Execute
    result = CliRunner().invoke(app, [*args, "--workers", "1", "--max-file-mib", "4", "--json"])
    # Assert
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["by_outcome"] == {
        "bad_lut": 3,
        "ingested": 1,
        "too_large": 3,
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["limits"]["max_file_bytes"] == 4 * MIB
    assert "bomb" not in result.output and "NaN" not in result.output


def test_cached_results_follow_the_budget_of_each_run(tmp_path: Path, ct_file: Path) -> None:
    # Prepare: a 2 MiB image ingested under a large budget (cached)
    big = crafted(ct_file, Rows=1024, Columns=1024)
    big.PixelData = np.full((1024, 1024), 100, dtype="<i2").tobytes()
    files = {"good.dcm": ct_file.read_bytes(), "big.dcm": to_bytes(big)}
    first = ingest_files(tmp_path, files, max_file_bytes=8 * MIB, overwrite=True)
    assert reasons(first) == {"big.dcm": None, "good.dcm": None}
    # Execute: the same export and cache with a 1 MiB budget, then 8 MiB again
    root, labels, site = tmp_path / "export", tmp_path / "labels.csv", tmp_path / "site"

    def run(limit: int) -> IngestReport:
        opts = IngestOptions(
            prep=Preprocessing(size=16),
            cache_dir=tmp_path / "cache",
            val_fraction=0.0,
            overwrite=True,
            max_file_bytes=limit,
        )
        return ingest(root, labels, site, options=opts)

    smaller, again = run(MIB), run(8 * MIB)
    # Assert: the budget decides, cache or not
    assert reasons(smaller) == {"big.dcm": Reason.TOO_LARGE.value, "good.dcm": None}
    assert reasons(again) == {"big.dcm": None, "good.dcm": None}
    assert again.cache_hits == 2
