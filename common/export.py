"""Deployable copies of a checkpoint: TorchScript (always) and ONNX (optional).

The exported module embeds the preprocessing of the training pipeline, so a hospital
feeds it images as they are stored and gets class probabilities back:

``uint8`` input
    ``(N, H, W)`` grey or ``(N, H, W, C)`` colour, values 0-255: the layout of a
    MedMNIST ``.npz`` file. Converted to float32 ``(N, C, H, W)`` by ``x / 255`` --
    bit for bit what ``simulation.data.datasets.to_model_images`` does before training and
    evaluation (IEEE float32 division in both).
floating input
    ``(N, C, H, W)`` in ``[0, 1]``: the layout of a site dataset's
    ``<split>_images.npy`` (``common.site_dataset``); cast to float32, otherwise
    unchanged. Tabular models (``heart-*``) take float32 ``(N, F, 1, 1)`` standardised
    features and refuse uint8.

The model's own intensity normalisation (e.g. ``(x - 0.5) / 0.25`` inside ``cnn``,
``gru``, ``lstm``, ``unet``) is part of its ``forward`` and therefore of the export.
Output: float32 softmax probabilities ``(N, K)`` (classification) or ``(N, K, H, W)``
(segmentation); the TorchScript module also has ``logits(x)`` and ``preprocess(x)``.

TorchScript file: the wrapper is compiled with ``torch.jit.script`` around the model
compiled with ``torch.jit.trace`` (the registered models' forward passes are traceable;
the GRU/LSTM time loop unrolls over the fixed ``H`` rows). The model card travels inside
the archive as the extra file :data:`CARD_FILE`, which is also how
:func:`load_exported` recognises an export. TorchScript is deprecated upstream since
torch 2.9 (still shipped and working in 2.13); the ONNX file is the forward-looking
format and is written with the ``torch.export``-based exporter (needs the optional extra
``medfed[export]``: onnx, onnxscript; onnxruntime for the check).

Every export is checked numerically before it is kept: :func:`export_model` feeds raw
inputs to the exported module and the preprocessed inputs to the PyTorch model
(:func:`common.evaluation.predict_proba`) and refuses (:class:`ExportError`) when the
largest absolute difference of the probabilities exceeds the tolerance.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.checkpoint import Checkpoint, load_checkpoint
from common.errors import ConfigError, DataError, MedfedError
from common.fsutil import atomic_write, atomic_write_bytes
from common.operating_point import OperatingPoint

log = logging.getLogger(__name__)

#: Name of the model card inside the TorchScript archive (``_extra_files``).
CARD_FILE = "medfed_card.json"
#: Files :func:`export_model` writes in its output directory.
TORCHSCRIPT_NAME = "model.ts"
ONNX_NAME = "model.onnx"
CARD_NAME = "model_card.json"
#: Largest accepted absolute difference of exported vs PyTorch probabilities.
DEFAULT_TOLERANCE = 1e-5
#: ONNX input kinds (one graph has one input dtype).
ONNX_INPUTS = ("uint8", "float32")
#: Tasks whose inputs are images (uint8 accepted).
IMAGE_TASKS = ("classification", "segmentation")


class ExportError(MedfedError, RuntimeError):
    """An export could not be written, or does not reproduce the PyTorch model."""


class Preprocess(nn.Module):
    """Stored images -> float32 ``(N, C, H, W)`` as the model reads them (scriptable).

    Parameters
    ----------
    channels : int
        ``C`` the model expects.
    accept_uint8 : bool
        Whether uint8 images (scaled by 1/255) are accepted; ``False`` for tabular
        models, whose float features must not be rescaled.
    size : tuple[int, int]
        ``(H, W)`` the model needs, or ``(0, 0)`` for any size (fully convolutional
        models). A traced GRU/LSTM unrolls exactly ``H`` time steps, so a wrong size must
        fail here rather than give a silently wrong answer.

    Notes
    -----
    uint8 ``(N, H, W)`` -> ``(N, 1, H, W)``; uint8 ``(N, H, W, C)`` -> ``(N, C, H, W)``
    (channels last, as MedMNIST stores colour); both divided by 255. Floating
    ``(N, C, H, W)`` is cast to float32. Anything else raises ``RuntimeError`` (in
    TorchScript: ``torch.jit.Error``) naming the accepted layouts.

    """

    def __init__(
        self, *, channels: int, accept_uint8: bool, size: tuple[int, int] = (0, 0)
    ) -> None:
        super().__init__()
        self.channels = channels
        self.accept_uint8 = accept_uint8
        self.height, self.width = int(size[0]), int(size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return float32 ``(N, C, H, W)``; see the class notes for accepted inputs."""
        if x.dtype == torch.uint8:
            if not self.accept_uint8:
                raise RuntimeError("this model takes float32 (N, F, 1, 1) features, not uint8")
            y = x.to(torch.float32) / 255.0
            if y.dim() == 3:
                y = y.unsqueeze(1)
            elif y.dim() == 4:
                y = y.permute(0, 3, 1, 2).contiguous()
            else:
                raise RuntimeError("uint8 images must be (N, H, W) or (N, H, W, C)")
        elif x.is_floating_point():
            if x.dim() != 4:
                raise RuntimeError("floating images must be (N, C, H, W) in [0, 1]")
            y = x.to(torch.float32)
        else:
            raise RuntimeError("images must be uint8 (0-255) or floating point ([0, 1])")
        if y.shape[1] != self.channels:
            raise RuntimeError(
                f"wrong number of channels: expected {self.channels}, got {y.shape[1]}"
            )
        if self.height > 0 and (y.shape[2] != self.height or y.shape[3] != self.width):
            raise RuntimeError(
                f"images must be {self.height} x {self.width}, got {y.shape[2]} x {y.shape[3]}"
            )
        return y


class ExportedModel(nn.Module):
    """:class:`Preprocess` -> model -> softmax over dim 1.

    Parameters
    ----------
    model : torch.nn.Module
        The registered model (eager, or already traced).
    channels : int
        Input channels ``C``.
    accept_uint8, size
        See :class:`Preprocess`.

    """

    def __init__(
        self,
        model: nn.Module,
        *,
        channels: int,
        accept_uint8: bool,
        size: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__()
        self.prep = Preprocess(channels=channels, accept_uint8=accept_uint8, size=size)
        self.model = model

    @torch.jit.export
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Convert stored images to float32 ``(N, C, H, W)`` (see :class:`Preprocess`)."""
        out: torch.Tensor = self.prep(x)
        return out

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs before the softmax: ``(N, K)`` or ``(N, K, H, W)``."""
        out: torch.Tensor = self.model(self.preprocess(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 probabilities ``(N, K)`` or ``(N, K, H, W)`` (softmax over dim 1)."""
        return torch.softmax(self.logits(x).float(), dim=1)


@dataclass(frozen=True)
class CheckBatch:
    """One equivalence-check input: raw as stored, and as the PyTorch model reads it.

    Attributes
    ----------
    name : str
        Shown in the card and the command output (e.g. ``"synthetic uint8"``).
    raw : numpy.ndarray
        Fed to the exported module: uint8 ``(N, H, W[, C])`` or float32 ``(N, C, H, W)``.
    model_input : numpy.ndarray
        float32 ``(N, C, H, W)`` fed to the PyTorch model: ``raw`` through the training
        pipeline's own preprocessing (``simulation.data.datasets.to_model_images`` for uint8).

    """

    name: str
    raw: np.ndarray
    model_input: np.ndarray


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes
    ----------
    torchscript : pathlib.Path
        The TorchScript file.
    card_path : pathlib.Path
        The model card JSON beside it.
    onnx : pathlib.Path or None
        The ONNX file, when asked for.
    diffs : dict[str, float or None]
        ``"<format> / <batch>"`` -> max absolute difference of probabilities vs PyTorch
        (``None``: not measured, see ``card["equivalence"]["notes"]``).
    card : dict
        The model card as written.

    """

    torchscript: Path
    card_path: Path
    onnx: Path | None
    diffs: dict[str, float | None] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)


def input_spec(ckpt: Checkpoint) -> dict[str, Any]:
    """Describe the exported module's inputs and outputs for the model card.

    Returns
    -------
    dict
        ``accepts`` (list of ``{dtype, shape, range}``), ``output`` and ``model-shape``.

    """
    from common.models import get_spec

    c, h, w = get_spec(ckpt.model).input_shape
    k = int(ckpt.model_kwargs.get("num_classes", len(ckpt.label_names) or 2))
    accepts: list[dict[str, Any]]
    if ckpt.task not in IMAGE_TASKS:
        accepts = [
            {"dtype": "float32", "shape": f"(N, {c}, {h}, {w})", "range": "standardised"},
        ]
    else:
        size = "H, W" if ckpt.task == "segmentation" else f"{h}, {w}"
        stored = f"(N, {size})" if c == 1 else f"(N, {size}, {c})"
        accepts = [
            {"dtype": "uint8", "shape": stored, "range": [0, 255], "scaled": "x / 255"},
            {"dtype": "float32", "shape": f"(N, {c}, {size})", "range": [0.0, 1.0]},
        ]
    out = f"(N, {k})" if ckpt.task != "segmentation" else f"(N, {k}, H, W)"
    return {
        "accepts": accepts,
        "model-shape": [c, h, w],
        "output": f"float32 {out} softmax probabilities over {k} classes",
        "segmentation-size-rule": (
            "H and W multiples of 16" if ckpt.task == "segmentation" else None
        ),
    }


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence known, harmless export noise only (never all warnings).

    - torch >= 2.9 deprecates ``torch.jit.*`` (logged once instead, see module notes);
    - ``TracerWarning`` from GroupNorm's batch-size check in
      ``torch.nn.functional._verify_batch_size`` (a Python bool, not data flow: the
      check batches of other sizes prove the trace generalises);
    - the ONNX exporter's notes about torchvision ops it does not register, and the
      INFO lines of its graph optimiser (onnxscript, onnx_ir).
    """
    quiet = {
        "torch.onnx._internal.exporter._registration": logging.ERROR,
        "onnxscript": logging.WARNING,
        "onnx_ir": logging.WARNING,
    }
    levels = {name: logging.getLogger(name).level for name in quiet}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings(
            "ignore", message="Converting a tensor to a Python boolean", module="torch"
        )
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`")
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def build_exportable(ckpt: Checkpoint) -> ExportedModel:
    """Return the eager :class:`ExportedModel` of a checkpoint (CPU, float32, eval mode)."""
    from common.models import get_spec

    spec = get_spec(ckpt.model)
    model = ckpt.build_model().to(device=torch.device("cpu"), dtype=torch.float32).eval()
    c, h, w = spec.input_shape
    return ExportedModel(
        model,
        channels=c,
        accept_uint8=ckpt.task in IMAGE_TASKS,
        size=(0, 0) if ckpt.task == "segmentation" else (h, w),
    ).eval()


def to_torchscript(ckpt: Checkpoint) -> torch.jit.ScriptModule:
    """Compile :func:`build_exportable` to TorchScript (traced model, scripted wrapper).

    Raises
    ------
    ExportError
        If tracing or scripting fails (names the model).

    """
    from common.models import get_spec

    eager = build_exportable(ckpt)
    example = torch.rand(
        (2, *get_spec(ckpt.model).input_shape),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float32,
    )
    try:
        with _quiet_exporters(), torch.no_grad():
            traced = torch.jit.trace(eager.model, example)  # type: ignore[no-untyped-call]
            scripted = torch.jit.script(
                ExportedModel(
                    traced,
                    channels=eager.prep.channels,
                    accept_uint8=eager.prep.accept_uint8,
                    size=(eager.prep.height, eager.prep.width),
                )
            )
    except Exception as exc:  # torch raises many types from its compilers
        raise ExportError(f"TorchScript compilation of model {ckpt.model!r} failed: {exc}") from exc
    scripted.eval()
    return scripted


def onnx_available() -> bool:
    """Whether the ONNX exporter's packages (onnx, onnxscript) are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


def to_onnx(ckpt: Checkpoint, path: Path, *, input_dtype: str) -> Path:
    """Write the ONNX graph of :func:`build_exportable` with a dynamic batch axis.

    Parameters
    ----------
    ckpt : Checkpoint
        The model.
    path : pathlib.Path
        Output ``.onnx`` file.
    input_dtype : str
        ``"uint8"`` (stored image layout, see module notes) or ``"float32"``
        (``(N, C, H, W)`` in ``[0, 1]``); an ONNX graph has one input dtype.

    Raises
    ------
    ConfigError
        Unknown ``input_dtype``, uint8 for a tabular model, or the exporter's packages
        missing (install ``medfed[export]``).
    ExportError
        If the exporter fails.

    """
    from common.models import get_spec

    if input_dtype not in ONNX_INPUTS:
        raise ConfigError(f"onnx input {input_dtype!r} must be one of {list(ONNX_INPUTS)}")
    if input_dtype == "uint8" and ckpt.task not in IMAGE_TASKS:
        raise ConfigError(f"task {ckpt.task!r} takes float32 features; use --onnx-input float32")
    if not onnx_available():
        raise ConfigError(
            "ONNX export needs the optional packages onnx and onnxscript: "
            "pip install 'medfed[export]' (or drop --onnx)"
        )
    c, h, w = get_spec(ckpt.model).input_shape
    gen = torch.Generator().manual_seed(0)
    if input_dtype == "uint8":
        shape = (2, h, w) if c == 1 else (2, h, w, c)
        example = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    else:
        example = torch.rand((2, c, h, w), generator=gen, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet_exporters():
            torch.onnx.export(
                build_exportable(ckpt),
                (example,),
                str(path),
                input_names=["images"],
                output_names=["probabilities"],
                dynamic_shapes={"x": {0: batch}},
                dynamo=True,
                external_data=False,  # one self-contained file (models here are < 2 GB)
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"ONNX export of model {ckpt.model!r} failed: {exc}") from exc
    return path


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ExportError(f"exported output {a.shape} differs in shape from PyTorch's {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _torchscript_probs(module: torch.jit.ScriptModule, raw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: torch.Tensor = module(torch.from_numpy(np.array(raw)))  # a writable copy
    return out.cpu().numpy()


def _onnx_probs(path: Path, raw: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(["probabilities"], {"images": np.ascontiguousarray(raw)})
    return np.asarray(out)


def _save_torchscript(module: torch.jit.ScriptModule, path: Path, card: Mapping[str, Any]) -> None:
    extra = {CARD_FILE: json.dumps(card, indent=2)}
    with _quiet_exporters():
        atomic_write(path, lambda fh: torch.jit.save(module, fh, _extra_files=extra), mode=None)


def _export_onnx(
    ckpt: Checkpoint,
    onnx_path: Path,
    onnx_input: str,
    checks: Sequence[CheckBatch],
    refs: Sequence[np.ndarray],
    *,
    diffs: dict[str, float | None],
    notes: list[str],
) -> None:
    """Write ``onnx_path`` and record its differences from ``refs`` in ``diffs``."""
    to_onnx(ckpt, onnx_path, input_dtype=onnx_input)
    matching = [(b, ref) for b, ref in zip(checks, refs, strict=True) if b.raw.dtype == onnx_input]
    if importlib.util.find_spec("onnxruntime") is None:
        notes.append("ONNX not checked: onnxruntime is not installed (medfed[export])")
        diffs["onnx"] = None
    elif not matching:
        notes.append(f"ONNX not checked: no {onnx_input} check batch")
        diffs["onnx"] = None
    else:
        for b, ref in matching:
            diffs[f"onnx / {b.name}"] = _max_abs_diff(_onnx_probs(onnx_path, b.raw), ref)


def _stage_torchscript(
    ckpt: Checkpoint,
    staged: Path,
    card: Mapping[str, Any],
    checks: Sequence[CheckBatch],
    refs: Sequence[np.ndarray],
    *,
    diffs: dict[str, float | None],
) -> Any:
    """Write the TorchScript module to ``staged``; return it loaded back and checked."""
    _save_torchscript(to_torchscript(ckpt), staged, card)
    try:
        with _quiet_exporters():
            loaded = torch.jit.load(str(staged), map_location="cpu")  # type: ignore[no-untyped-call]
        for b, ref in zip(checks, refs, strict=True):
            diffs[f"torchscript / {b.name}"] = _max_abs_diff(_torchscript_probs(loaded, b.raw), ref)
    except MedfedError:
        staged.unlink(missing_ok=True)
        raise
    except Exception as exc:  # a runtime error of the compiled module
        staged.unlink(missing_ok=True)
        raise ExportError(f"the TorchScript module failed on the check inputs: {exc}") from exc
    return loaded


def _equivalence(
    tolerance: float,
    checks: Sequence[CheckBatch],
    diffs: dict[str, float | None],
    notes: list[str],
) -> dict[str, Any]:
    """Return the model card's ``equivalence`` entry."""
    return {
        "tolerance": tolerance,
        "metric": "max absolute difference of probabilities, exported(raw) vs PyTorch model "
        "(preprocessed input, common.evaluation.predict_proba)",
        "batches": {b.name: [int(s) for s in b.raw.shape] for b in checks},
        "max-abs-diff": diffs,
        "max": max((v for v in diffs.values() if v is not None), default=None),
        "notes": notes,
    }


def export_model(
    ckpt: Checkpoint,
    out_dir: Path,
    *,
    checks: Sequence[CheckBatch],
    card: Mapping[str, Any],
    onnx_input: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Write ``model.ts`` (+ ``model.onnx``) and ``model_card.json``, checked numerically.

    Parameters
    ----------
    ckpt : Checkpoint
        The model to export.
    out_dir : pathlib.Path
        Created if needed.
    checks : Sequence[CheckBatch]
        Inputs for the equivalence check (at least one). The TorchScript module is
        checked on every batch, loaded back from the file written; the ONNX graph on
        the batches whose raw dtype is its input dtype.
    card : Mapping[str, Any]
        Model card fields from the caller (run, privacy, versions...); this function
        adds ``model``, ``model-kwargs``, ``task``, ``label-names`` and ``round`` from
        ``ckpt`` unless ``card`` has them, and ``input``, ``files`` and ``equivalence``.
    onnx_input : str or None
        ``None``: no ONNX; else ``"uint8"`` or ``"float32"`` (see :func:`to_onnx`).
    tolerance : float
        Largest accepted max absolute difference of probabilities (default 1e-5).

    Returns
    -------
    ExportResult

    Raises
    ------
    ConfigError
        No check batches, a non-positive tolerance, or ONNX asked for without its
        packages.
    ExportError
        Compilation failed, or an exported module differs from PyTorch by more than
        ``tolerance`` (nothing is left in ``out_dir`` then).

    """
    from common.device import resolve_device
    from common.evaluation import predict_proba

    if not checks:
        raise ConfigError("export needs at least one check batch for the equivalence check")
    if not tolerance > 0:
        raise ConfigError(f"tolerance={tolerance} must be > 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference, cpu = ckpt.build_model(), resolve_device("cpu")
    refs = [predict_proba(reference, b.model_input, device=cpu) for b in checks]
    diffs: dict[str, float | None] = {}
    notes: list[str] = []
    identity = {
        "model": ckpt.model,
        "model-kwargs": dict(ckpt.model_kwargs),
        "task": ckpt.task,
        "label-names": list(ckpt.label_names),
        "round": ckpt.round,
        # the decision threshold chosen on the sites' pooled validation (or None: 0.5)
        "operating-point": ckpt.operating_point,
    }
    full = {**identity, **card, "input": input_spec(ckpt)}

    ts_path = out_dir / TORCHSCRIPT_NAME
    staged = out_dir / f".{TORCHSCRIPT_NAME}.check"
    loaded = _stage_torchscript(ckpt, staged, full, checks, refs, diffs=diffs)

    onnx_path: Path | None = None
    if onnx_input is not None:
        onnx_path = out_dir / ONNX_NAME
        _export_onnx(ckpt, onnx_path, onnx_input, checks, refs, diffs=diffs, notes=notes)

    worst = {k: v for k, v in diffs.items() if v is not None and not v <= tolerance}
    if worst:
        staged.unlink(missing_ok=True)
        if onnx_path is not None:
            onnx_path.unlink(missing_ok=True)
        raise ExportError(
            "exported model differs from the PyTorch model by more than tolerance="
            f"{tolerance:g} (max abs difference of probabilities): "
            + ", ".join(f"{k}: {v:.3g}" for k, v in worst.items())
            + "; nothing was kept."
        )
    full["files"] = {
        "torchscript": TORCHSCRIPT_NAME,
        "onnx": ONNX_NAME if onnx_path else None,
        "onnx-input": onnx_input,
    }
    full["equivalence"] = _equivalence(tolerance, checks, diffs, notes)
    _save_torchscript(loaded, ts_path, full)  # the checked module, now with the full card
    staged.unlink(missing_ok=True)
    card_path = out_dir / CARD_NAME
    atomic_write_bytes(card_path, (json.dumps(full, indent=2) + "\n").encode(), mode=None)
    log.info("exported %s to %s (max abs diff %s)", ckpt.model, ts_path, full["equivalence"]["max"])
    return ExportResult(ts_path, card_path, onnx_path, diffs, full)


def is_exported(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a TorchScript archive holding :data:`CARD_FILE` (no torch load)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as zf:
            return any(n.endswith(f"/extra/{CARD_FILE}") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False  # a damaged archive: load_checkpoint refuses it with a DataError


def load_exported(
    path: str | os.PathLike[str],
) -> tuple[torch.jit.ScriptModule, dict[str, Any]] | None:
    """Load a ``medfed export`` TorchScript file; ``None`` for any other file.

    Returns
    -------
    tuple or None
        ``(module, card)`` on the CPU: ``module(x)`` gives probabilities,
        ``module.logits(x)`` the model outputs (see the module notes).

    Raises
    ------
    DataError
        If the archive carries the marker but cannot be loaded or its card is not JSON.

    """
    if not is_exported(path):
        return None
    extra = {CARD_FILE: ""}
    try:
        with _quiet_exporters():
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(path), map_location="cpu", _extra_files=extra
            )
        card = json.loads(extra[CARD_FILE])
    except Exception as exc:  # torch raises many types for a damaged archive
        raise DataError(f"{path} looks like a medfed export but does not load: {exc}") from exc
    if not isinstance(card, dict):
        raise DataError(f"{path} looks like a medfed export but its model card is not a table")
    module.eval()
    return module, card


class ExportedLogits(nn.Module):
    """Adapter: an exported module as a model of the training pipeline.

    ``forward(x)`` with float32 ``(N, C, H, W)`` in ``[0, 1]`` returns the exported
    module's ``logits(x)``, so :meth:`common.tasks.Task.evaluate` (which applies the
    softmax and the task's loss itself) scores the exported graph, preprocessing
    included.
    """

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.exported = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)`` or ``(N, K, H, W)`` of the exported model."""
        out: torch.Tensor = self.exported.logits(x)
        return out


def load_model_file(path: str | os.PathLike[str]) -> tuple[Checkpoint, nn.Module]:
    """Load a medfed checkpoint or a ``medfed export`` TorchScript file for evaluation.

    Returns
    -------
    tuple[Checkpoint, torch.nn.Module]
        The checkpoint's description and the model (``(N, C, H, W)`` float32 in
        ``[0, 1]`` -> logits). For an export, the :class:`Checkpoint` is rebuilt from
        the card with an **empty** ``state_dict`` (the weights live in the TorchScript
        module) and the model is an :class:`ExportedLogits`.

    Raises
    ------
    DataNotFoundError, DataError
        As :func:`common.checkpoint.load_checkpoint`, or a broken export.

    """
    exported = load_exported(path)
    if exported is None:
        ckpt = load_checkpoint(path)
        return ckpt, ckpt.build_model()
    module, card = exported
    try:
        ckpt = Checkpoint(
            model=str(card["model"]),
            model_kwargs=dict(card.get("model-kwargs", {})),
            task=str(card["task"]),
            state_dict={},
            round=int(card.get("round") or 0),
            label_names=list(card.get("label-names", [])),
            operating_point=(
                None
                if card.get("operating-point") is None
                else OperatingPoint.from_dict(card["operating-point"]).as_dict()
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: the export's model card lacks {exc}") from exc
    return ckpt, ExportedLogits(module).eval()
