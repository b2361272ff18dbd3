"""Glue for ``medfed explain`` / ``medfed export`` and the report's explain figure.

Loads a split the way ``medfed evaluate`` does (a MedMNIST ``.npz`` or a site dataset
directory), builds the equivalence-check inputs for :func:`common.export.export_model`
with the training pipeline's own preprocessing, and assembles the model card from the
checkpoint and, when it is found beside the checkpoint, the run directory written by the
ServerApp (``rounds.jsonl`` from ``server.runlog``, ``config.json``).

Lives in ``simulation`` because it reads MedMNIST files and run directories (researcher
and coordinator tooling); the model-side code is in ``common.explain`` and
``common.export``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.checkpoint import Checkpoint, load_checkpoint
from common.device import resolve_device
from common.errors import MedfedError
from common.explain import ExplainResult, decision_threshold, explain_arrays
from common.export import IMAGE_TASKS, CheckBatch
from common.fsutil import sha256_file
from common.models import get_spec
from common.site_dataset import SiteDataset
from common.tasks import get_task
from server.runlog import ROUNDS_FILE
from simulation.data.datasets import load_medmnist_split, to_model_images
from simulation.data.sites import GLOBAL_EVAL
from simulation.research.summary import read_rounds, site_validation

log = logging.getLogger(__name__)

#: ``format`` of the model card.
CARD_FORMAT = "medfed-model-card"
CARD_VERSION = 1
#: Model files of a run directory, in order of preference for the report.
RUN_MODELS = ("best_model.pt", "final_model.pt")
#: Distributions whose versions the model card records.
VERSIONED = (
    "medfed",
    "torch",
    "numpy",
    "flwr",
    "opacus",
    "monai",
    "onnx",
    "onnxscript",
    "onnxruntime",
)


@dataclass(frozen=True)
class SplitData:
    """One split, raw and as the model reads it.

    Attributes
    ----------
    raw : numpy.ndarray
        As stored: uint8 ``(N, H, W[, 3])`` (``.npz``) or float32 ``(N, C, H, W)`` in
        ``[0, 1]`` (site dataset, memory-mapped).
    images : numpy.ndarray
        float32 ``(N, C, H, W)`` in ``[0, 1]``: ``to_model_images(raw)`` or ``raw``.
    labels : numpy.ndarray
        int64 ``(N,)`` (or ``(N, H, W)`` masks for segmentation).
    label_names : list[str]
        Class names (the site manifest's, else the checkpoint's).
    source : str
        ``"<data> (<split> split)"`` for titles and cards.

    """

    raw: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    source: str


def load_split(ckpt: Checkpoint, data: Path, split: str) -> SplitData:
    """Load ``split`` of a ``.npz`` file or site dataset directory for ``ckpt``'s model.

    Same sources and checks as ``medfed evaluate``: a site dataset is checked against
    the model with the task's ``check_dataset``; a ``.npz`` file's image shape with the
    task's ``check_image_shape``.

    Raises
    ------
    DataNotFoundError, DataError
        Missing file or split, or images that do not fit the model.

    """
    task = get_task(ckpt.task)
    if data.is_dir():
        site = SiteDataset(data)
        task.check_dataset(
            site,
            model=ckpt.model,
            num_classes=int(ckpt.model_kwargs.get("num_classes", len(site.label_names))),
        )
        arrays = site.load(split)
        raw, images, labels = arrays.images, arrays.images, arrays.labels
        names = list(site.label_names)
    else:
        raw, labels = load_medmnist_split(data, split)
        images = to_model_images(raw)
        task.check_image_shape(
            images.shape[1:], spec_shape=get_spec(ckpt.model).input_shape, model=ckpt.model
        )
        names = list(ckpt.label_names)
    return SplitData(
        raw, images, labels, names or list(ckpt.label_names), f"{data.name} ({split} split)"
    )


def check_batches(
    ckpt: Checkpoint, data: SplitData | None = None, *, n: int = 32, seed: int = 0
) -> list[CheckBatch]:
    """Return the inputs for the export's equivalence check (``common.export.CheckBatch``).

    Always: ``n`` synthetic images drawn by ``numpy.random.default_rng(seed)`` as uint8
    in the stored layout (image models; preprocessed with
    ``simulation.data.datasets.to_model_images``, the training pipeline's own function) and as
    float32 ``(N, C, H, W)`` in ``[0, 1]`` (tabular models: standard-normal features).
    With ``data``: its first ``n`` images, raw as stored vs as the model reads them.
    """
    c, h, w = get_spec(ckpt.model).input_shape
    rng = np.random.default_rng(seed)
    out: list[CheckBatch] = []
    if ckpt.task in IMAGE_TASKS:
        raw = rng.integers(0, 256, size=(n, h, w) if c == 1 else (n, h, w, c), dtype=np.uint8)
        out.append(CheckBatch("synthetic uint8", raw, to_model_images(raw)))
        floats = rng.random((n, c, h, w), dtype=np.float32)
    else:
        floats = rng.standard_normal((n, c, h, w), dtype=np.float32)
    out.append(CheckBatch("synthetic float32", floats, floats))
    if data is not None:
        k = min(n, int(data.raw.shape[0]))
        raw_k = np.array(data.raw[:k])  # a copy: the site arrays are read-only memory maps
        out.append(CheckBatch(data.source, raw_k, np.asarray(data.images[:k], np.float32)))
    return out


def find_run_dir(checkpoint: Path, ckpt: Checkpoint) -> Path | None:
    """Return the run directory of a checkpoint, which holds ``rounds.jsonl`` (``server.runlog``).

    Looked for beside the file (``final_model.pt``, ``best_model.pt``), one level up
    (``checkpoints/round-NNN.pt``) and at the run config's ``run-dir``.
    """
    here = checkpoint.resolve().parent
    candidates = [here, here.parent]
    if run_dir := str(ckpt.run_config.get("run-dir", "")):
        candidates.append(Path(run_dir))
    return next((c for c in candidates if (c / ROUNDS_FILE).is_file()), None)


def site_summary(rounds: list[dict[str, Any]], upto: int) -> dict[str, dict[str, Any]]:
    """Per site (Flower node id), from the training replies of rounds ``1..upto``.

    Returns
    -------
    dict[str, dict]
        ``train-examples`` (of its last reply), ``epsilon`` and ``delta`` (last reported:
        the site's cumulative privacy spent, DESIGN section 5; ``None`` without DP),
        ``rounds-trained`` and ``last-round``.

    """
    out: dict[str, dict[str, Any]] = {}
    for r in rounds:
        if not 0 < int(r.get("round", 0)) <= upto:
            continue
        for node, m in r.get("train", {}).get("sites", {}).items():
            prev = out.get(str(node), {"rounds-trained": 0})
            out[str(node)] = {
                "train-examples": m.get("num-examples", prev.get("train-examples")),
                "epsilon": m.get("epsilon", prev.get("epsilon")),
                "delta": m.get("delta", prev.get("delta")),
                "rounds-trained": prev["rounds-trained"] + 1,
                "last-round": int(r["round"]),
            }
    return dict(sorted(out.items()))


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (hex) of ``json.dumps(config, sort_keys=True, separators=(",", ":"))``."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def library_versions() -> dict[str, str | None]:
    """Installed versions (``importlib.metadata``) of :data:`VERSIONED`; ``None`` if absent."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _label_names(
    ckpt: Checkpoint, config: dict[str, Any], data: SplitData | None
) -> tuple[list[str], str]:
    """Class names and where they came from: checkpoint, --data, or the run's eval set."""
    if ckpt.label_names:
        return list(ckpt.label_names), "checkpoint"
    if data is not None and data.label_names:
        return list(data.label_names), f"data {data.source}"
    eval_dir = Path(str(config.get("eval-dataset-dir") or ""))
    if str(eval_dir) not in ("", ".") and (eval_dir / "manifest.json").is_file():
        return list(SiteDataset(eval_dir).label_names), "run's eval-dataset-dir manifest"
    return [], "unknown: the checkpoint has none and no dataset was found"


def model_card(ckpt: Checkpoint, checkpoint: Path, data: SplitData | None = None) -> dict[str, Any]:
    """Return the model card fields that come from the checkpoint and its run directory.

    :func:`common.export.export_model` adds ``input``, ``files`` and ``equivalence``.
    Fields that cannot be known are ``null`` with a ``*-note`` saying why. Class names
    come from the checkpoint, else from ``data``, else from the run's held-out site
    dataset (``label-names-source`` says which).
    """
    k = int(ckpt.model_kwargs.get("num_classes", len(ckpt.label_names) or 2))
    decision = decision_threshold(ckpt, k) if ckpt.task != "segmentation" else None
    run_dir = find_run_dir(checkpoint, ckpt)
    rounds = read_rounds(run_dir) if run_dir else []
    config = dict(ckpt.run_config)
    config_source = "checkpoint run-config"
    if not config and run_dir and (run_dir / "config.json").is_file():
        config = json.loads((run_dir / "config.json").read_text())
        config_source = "run directory config.json"
    sites = site_summary(rounds, ckpt.round) if rounds else None
    names, names_source = _label_names(ckpt, config, data)
    if run_dir is None:
        sites_note = (
            f"no rounds.jsonl beside {checkpoint.name}, one level up or at the run config's "
            "run-dir: per-site examples and privacy budgets unknown"
        )
    elif not sites:
        sites_note = f"no site replied to training in rounds 1..{ckpt.round} of {run_dir}"
    elif all(s["epsilon"] is None for s in sites.values()):
        sites_note = "DP was off in this run: no epsilon/delta in the round log"
    else:
        sites_note = None
    noise = sorted({str(r["dp-noise"]) for r in rounds if "dp-noise" in r}) or None
    validated = site_validation(rounds).get(ckpt.round, {}).get("metrics") if rounds else None
    return {
        "format": CARD_FORMAT,
        "version": CARD_VERSION,
        "exported-at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source-checkpoint": {"file": checkpoint.name, "sha256": sha256_file(checkpoint)},
        "model": ckpt.model,
        "model-kwargs": dict(ckpt.model_kwargs),
        "task": ckpt.task,
        "label-names": names,
        "label-names-source": names_source,
        "threshold": None if decision is None else decision.threshold,
        "threshold-source": None if decision is None else decision.source,
        "round": ckpt.round,
        "num-server-rounds": config.get("num-server-rounds"),
        "run-dir": str(run_dir) if run_dir else None,
        "sites": sites,
        "sites-note": sites_note,
        "privacy": {
            "dp-enabled": config.get("dp.enabled"),
            "dp-noise": noise,
            "accountant": config.get("dp.accountant"),
            "epsilon-meaning": "cumulative at each site up to the checkpoint's round (the "
            "site's own ledger); delta is the site's",
        },
        "validation-metrics": {
            "held-out": dict(ckpt.metrics) or None,
            "held-out-source": f"server-side evaluation after round {ckpt.round} "
            "(run config eval-dataset-dir), stored in the checkpoint",
            "sites": validated,
            "sites-source": "example-weighted mean of the sites' local validation of this "
            "round's global model (rounds.jsonl)",
        },
        "versions": library_versions(),
        "config-hash": config_hash(config) if config else None,
        "config-hash-source": config_source if config else "no run config found",
        "config-hash-rule": "sha256 of json.dumps(config, sort_keys=True, separators=(',', ':'))",
    }


def explain_checkpoint(
    ckpt: Checkpoint,
    data: SplitData,
    out_dir: Path,
    *,
    n: int = 16,
    seed: int = 0,
    stem: str = "explain",
    device: torch.device,
    meta: dict[str, Any] | None = None,
) -> ExplainResult:
    """Run :func:`common.explain.explain_arrays` for a checkpoint on a loaded split.

    Returns
    -------
    common.explain.ExplainResult

    Raises
    ------
    ConfigError
        Models explain does not support (see ``common.explain``).

    """
    model = ckpt.build_model()
    k = int(ckpt.model_kwargs.get("num_classes", len(data.label_names) or 2))
    return explain_arrays(
        model,
        data.images,
        data.labels,
        task=ckpt.task,
        label_names=data.label_names,
        decision=decision_threshold(ckpt, k),
        out_dir=out_dir,
        stem=stem,
        n=n,
        seed=seed,
        device=device,
        title=f"model {ckpt.model}, round {ckpt.round}, on {data.source}",
        meta={"model": ckpt.model, "round": ckpt.round, "data": data.source, **(meta or {})},
    )


def report_explain(run_dir: Path, out_dir: Path, *, n: int = 8, seed: int = 0) -> list[str]:
    """Write ``explain.png`` for a run's report, when it can be done; return file names.

    Uses ``best_model.pt`` if the run has one, else ``final_model.pt``, on the ``val``
    split of the run's held-out site dataset (run config ``eval-dataset-dir``, else
    ``sites/global-val``), with ``n`` images on the CPU. Returns ``[]`` (and logs why)
    when there is no model, no held-out data, or the model is not an image classifier;
    a failure never stops the report.
    """
    model_path = next((run_dir / m for m in RUN_MODELS if (run_dir / m).is_file()), None)
    if model_path is None:
        log.debug("report: no %s in %s, no explain figure", " or ".join(RUN_MODELS), run_dir)
        return []
    cfg_path = run_dir / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    data = Path(str(config.get("eval-dataset-dir") or run_dir / "sites" / GLOBAL_EVAL))
    if not data.is_dir():
        log.info("report: no held-out site dataset at %s, no explain figure", data)
        return []
    try:
        ckpt = load_checkpoint(model_path)
        if ckpt.task != "classification":
            log.info("report: explain covers image classifiers only (task %s)", ckpt.task)
            return []
        splits = SiteDataset(data).splits
        split = "val" if "val" in splits else splits[0]
        result = explain_checkpoint(
            ckpt,
            load_split(ckpt, data, split),
            out_dir,
            n=n,
            seed=seed,
            device=resolve_device("cpu"),
            meta={"checkpoint": model_path.name},
        )
    except (MedfedError, IndexError) as exc:
        log.warning("report: no explain figure: %s", exc)
        return []
    return [result.png.name]
