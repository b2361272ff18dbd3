"""Self-describing, stable checkpoints of a global model.

A checkpoint is a ``torch.save`` file of plain containers and tensors (loadable with
``torch.load(weights_only=True)``, so loading never executes pickled code)::

    {"format": "medfed-checkpoint", "version": 1,
     "model": "cnn", "model-kwargs": {...}, "task": "classification",
     "label-names": [...] or [], "round": int, "run-config": {...},
     "metrics": {...}, "state-dict": {name: tensor},
     "selected-round": int or None, "selection-metric": str or None,
     "operating-point": {...} or None}

``selected-round`` and ``selection-metric`` mark a model chosen by federated model
selection (``best_model.pt``, server/selection.py): the round whose global model scored
best on the sites' aggregated validation, and the metric it was chosen by (``metrics``
then holds that round's aggregated ``val-*`` metrics). They are ``None`` in other
checkpoints and absent from checkpoints written before model selection existed, which
still load. ``operating-point`` is the decision threshold of a binary classifier chosen on
the sites' pooled validation (common/operating_point.py), or ``None`` (argmax).

Anyone can rebuild the model from the file alone with :func:`load_checkpoint`.

A checkpoint is input from elsewhere (a colleague, a download), so loading checks it
before spending memory on it and fails with a :class:`~common.errors.DataError` that says
what is wrong: the ``torch.save`` zip archive's declared uncompressed sizes are read with
:mod:`zipfile` before ``torch.load`` (total at most :data:`MAX_CHECKPOINT_BYTES`, and no
entry that inflates: ``torch.save`` stores entries uncompressed, so a large expansion
ratio is a decompression bomb); every field must be present with its type; the model
arguments must be parameters of the model's factory, scalars of the right type and
within :data:`MODEL_INT_LIMITS`; and the weights must fit the model, checked on a
skeleton built on PyTorch's ``meta`` device (no memory) before the real model is built.
"""

from __future__ import annotations

import inspect
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.config import MAX_NUM_CLASSES, TASKS
from common.errors import DataError, DataNotFoundError, MedfedError, ModelError
from common.fsutil import atomic_write
from common.models import check_model_name, get_model, get_spec
from common.operating_point import OperatingPoint
from common.records import check_state, expected_spec

FORMAT = "medfed-checkpoint"
VERSION = 1

#: Largest checkpoint accepted: the file, and the sum of the uncompressed sizes its zip
#: archive declares. The registered models within :data:`MODEL_INT_LIMITS` stay far below.
MAX_CHECKPOINT_BYTES = 512 * 2**20
#: Largest ratio of an archive entry's declared uncompressed size to its compressed size
#: (plus 4 KiB). ``torch.save`` stores entries uncompressed (ratio 1) and float weights
#: barely compress, so a higher ratio means an entry that inflates far beyond the file
#: (a decompression bomb).
MAX_EXPANSION_RATIO = 8.0
#: Most entries a checkpoint archive may have (one per tensor storage, plus a few).
MAX_ARCHIVE_ENTRIES = 100_000
#: Upper bound of each integer model argument (lower bound 1); others: ``DEFAULT_INT_LIMIT``.
#: They keep building the ``meta`` skeleton quick; the memory a model may take is bounded
#: by its weights fitting in :data:`MAX_CHECKPOINT_BYTES`.
MODEL_INT_LIMITS: dict[str, int] = {
    "num_classes": MAX_NUM_CLASSES,
    "in_channels": 64,
    "width": 1024,
    "hidden_size": 4096,
    "depth": 8,
}
DEFAULT_INT_LIMIT = 10_000
#: Every field :func:`save_checkpoint` writes, with what it must be. Checkpoints written
#: before model selection lack ``selected-round`` and ``selection-metric`` (read as None).
FIELDS: dict[str, str] = {
    "format": f"the string {FORMAT!r}",
    "version": f"the integer {VERSION}",
    "model": "a registered model name",
    "model-kwargs": "a table of scalar model arguments",
    "task": f"one of {list(TASKS)}",
    "label-names": "a list of strings",
    "round": "an integer >= 0",
    "run-config": "a table of scalars",
    "metrics": "a table of numbers",
    "state-dict": "a table of tensors",
    "selected-round": "None, or the integer 'round' (the round model selection chose)",
    "selection-metric": "None, or a metric name such as 'val-balanced-accuracy'",
    "operating-point": "None, or a table with 'threshold' in [0, 1], 'method', ...",
}
#: What a ``selection-metric`` may look like (a metric key, e.g. ``val-loss``).
METRIC_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{0,63}")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint; :meth:`build_model` returns the model with its weights."""

    model: str
    model_kwargs: dict[str, Any]
    task: str
    state_dict: dict[str, torch.Tensor]
    round: int = 0
    label_names: list[str] = field(default_factory=list)
    run_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    #: ``best_model.pt``: the round model selection chose (equal to ``round``); else None.
    selected_round: int | None = None
    #: ``best_model.pt``: the metric it was chosen by (``val-balanced-accuracy``...).
    selection_metric: str | None = None
    #: The decision threshold chosen on federated validation
    #: (:meth:`common.operating_point.OperatingPoint.as_dict`); None: argmax (0.5).
    operating_point: dict[str, Any] | None = None

    def build_model(self) -> nn.Module:
        """Instantiate the registered model and load the weights (strict, checked).

        Raises
        ------
        ModelError
            If the model arguments are not the factory's, or the weights do not fit the
            model's keys, shapes or dtypes (checked on a ``meta``-device skeleton first,
            so no memory is spent on a model the weights do not fit).

        """
        check_model_kwargs(self.model, self.model_kwargs)
        check_state(self.state_dict, _skeleton_spec(self.model, self.model_kwargs))
        model = get_model(self.model, **self.model_kwargs)
        model.load_state_dict(self.state_dict, strict=True)
        model.eval()
        return model


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically and durably (:func:`common.fsutil.atomic_write`).

    Returns
    -------
    pathlib.Path
        The path written.

    """
    out = Path(path)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": ckpt.model,
        "model-kwargs": dict(ckpt.model_kwargs),
        "task": ckpt.task,
        "label-names": list(ckpt.label_names),
        "round": int(ckpt.round),
        "run-config": dict(ckpt.run_config),
        "metrics": {k: float(v) for k, v in ckpt.metrics.items()},
        "state-dict": {k: v.detach().cpu().contiguous() for k, v in ckpt.state_dict.items()},
        "selected-round": None if ckpt.selected_round is None else int(ckpt.selected_round),
        "selection-metric": ckpt.selection_metric,
        "operating-point": None if ckpt.operating_point is None else dict(ckpt.operating_point),
    }
    atomic_write(out, lambda fh: torch.save(payload, fh), mode=None)
    return out


def check_model_kwargs(model: str, kwargs: Mapping[str, Any]) -> None:
    """Check model arguments against the factory's signature and :data:`MODEL_INT_LIMITS`.

    Parameters
    ----------
    model : str
        A registered model name.
    kwargs : Mapping[str, Any]
        Keyword arguments for :func:`common.models.get_model`.

    Raises
    ------
    ModelError
        If the model is not registered, an argument is not a parameter of its factory, a
        value is not a scalar of the parameter's type (``bool``/``int``/``float``/``str``,
        from the factory's default) or an integer is outside ``[1, limit]``.

    """
    check_model_name(model)
    params = {
        name: p
        for name, p in inspect.signature(get_spec(model).factory).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    for name, value in kwargs.items():
        if name not in params:
            raise ModelError(
                f"model {model!r} has no argument {name!r}; its arguments are {sorted(params)}"
            )
        default = params[name].default
        typ = type(default) if default is not inspect.Parameter.empty else None
        if typ not in (bool, int, float, str):
            typ = None
        ok = (
            isinstance(value, bool | int | float | str)
            if typ is None
            else isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
        )
        if not ok:
            expected = "a scalar" if typ is None else f"of type {typ.__name__}"
            raise ModelError(
                f"model argument {name!r} must be {expected}, got {type(value).__name__} "
                f"{_short(value)}"
            )
        if isinstance(value, int) and not isinstance(value, bool):
            limit = MODEL_INT_LIMITS.get(name, DEFAULT_INT_LIMIT)
            if not 1 <= value <= limit:
                raise ModelError(
                    f"model argument {name}={value} is outside [1, {limit}]; no medfed model "
                    "is that size"
                )


def _skeleton_spec(model: str, kwargs: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``expected_spec`` of the model built on the ``meta`` device (allocates nothing).

    Raises
    ------
    ModelError
        If the factory refuses the arguments, or the model's weights would not fit in a
        checkpoint of :data:`MAX_CHECKPOINT_BYTES` (so building it would take more memory
        than any checkpoint can justify).

    """
    try:
        with torch.device("meta"):
            skeleton = get_model(model, **kwargs)
    except MedfedError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ModelError(f"model {model!r} cannot be built from arguments {kwargs}: {exc}") from exc
    state = skeleton.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    if nbytes > MAX_CHECKPOINT_BYTES:
        raise ModelError(
            f"model {model!r} with arguments {kwargs} would hold {nbytes / 2**20:.0f} MiB of "
            f"weights, above the {MAX_CHECKPOINT_BYTES // 2**20} MiB checkpoint limit"
        )
    return expected_spec(skeleton)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_archive(p: Path) -> None:
    """Refuse a file, or a zip archive's declared contents, that is too large or inflates.

    Raises
    ------
    DataError
        Above :data:`MAX_CHECKPOINT_BYTES`, :data:`MAX_EXPANSION_RATIO` or
        :data:`MAX_ARCHIVE_ENTRIES`, or a damaged archive.

    """
    size = p.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise DataError(
            f"{p} is {size} bytes, above the {MAX_CHECKPOINT_BYTES} byte limit for a medfed "
            "checkpoint; is it the right file?"
        )
    if not zipfile.is_zipfile(p):
        return  # torch's legacy format, or not torch at all: torch.load decides
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(
            f"{p} is a damaged zip archive, not a readable checkpoint ({exc})"
        ) from None
    if len(infos) > MAX_ARCHIVE_ENTRIES:
        raise DataError(
            f"{p} holds {len(infos)} archive entries (limit {MAX_ARCHIVE_ENTRIES}); it is not "
            "a medfed checkpoint"
        )
    declared = sum(i.file_size for i in infos)
    if declared > MAX_CHECKPOINT_BYTES:
        raise DataError(
            f"{p} declares {declared} bytes of uncompressed content, above the "
            f"{MAX_CHECKPOINT_BYTES} byte limit for a medfed checkpoint; refusing to load it"
        )
    for info in infos:
        if info.file_size > MAX_EXPANSION_RATIO * info.compress_size + 4096:
            raise DataError(
                f"{p}: archive entry {info.filename!r} inflates from {info.compress_size} to "
                f"{info.file_size} bytes; torch.save does not compress, so this is not a "
                "checkpoint medfed wrote and it is not loaded (a decompression bomb would "
                "exhaust memory)"
            )


def _get(raw: Mapping[str, Any], key: str, p: Path) -> Any:
    if key not in raw:
        raise DataError(
            f"{p} lacks the field {key!r} ({FIELDS[key]}); it was not written by medfed's "
            "save_checkpoint or was edited. Use the final_model.pt or checkpoints/round-*.pt "
            "of a medfed run."
        )
    return raw[key]


def _bad(p: Path, key: str, value: Any) -> DataError:
    return DataError(
        f"{p}: field {key!r} must be {FIELDS[key]}, got {type(value).__name__} {_short(value)}"
    )


def _str_table(raw: Mapping[str, Any], key: str, p: Path, ok: Any) -> dict[str, Any]:
    value = _get(raw, key, p)
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _bad(p, key, value)
    for k, v in value.items():
        if not ok(v):
            raise DataError(
                f"{p}: field {key!r} must be {FIELDS[key]}; entry {k!r} is "
                f"{type(v).__name__} {_short(v)}"
            )
    return dict(value)


def _parse(raw: Any, p: Path) -> Checkpoint:
    """Check every field of a loaded checkpoint (see :data:`FIELDS`) and build it.

    Raises
    ------
    DataError
        A missing field, a value of the wrong type, an unknown model or task, or model
        arguments / weights that do not fit the model (the message names the field).

    """
    fmt = raw.get("format") if isinstance(raw, Mapping) else None
    if not isinstance(fmt, str) or fmt != FORMAT:
        raise DataError(f"{p} is not a medfed checkpoint (no 'format': {FORMAT!r})")
    version = _get(raw, "version", p)
    if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
        raise DataError(f"{p} is checkpoint version {_short(version)}, expected {VERSION}")
    model = _get(raw, "model", p)
    if not isinstance(model, str):
        raise _bad(p, "model", model)
    task = _get(raw, "task", p)
    if not isinstance(task, str) or task not in TASKS:
        raise _bad(p, "task", task)
    scalar = (bool, int, float, str)
    kwargs = _str_table(raw, "model-kwargs", p, lambda v: isinstance(v, scalar))
    state = _str_table(raw, "state-dict", p, lambda v: isinstance(v, torch.Tensor))
    run_config = _str_table(raw, "run-config", p, lambda v: isinstance(v, scalar))
    metrics = _str_table(
        raw, "metrics", p, lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    )
    labels = _get(raw, "label-names", p)
    if (
        not isinstance(labels, list | tuple)
        or len(labels) > MAX_NUM_CLASSES
        or not all(isinstance(n, str) for n in labels)
    ):
        raise _bad(p, "label-names", labels)
    rnd = _get(raw, "round", p)
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise _bad(p, "round", rnd)
    selected_round, selection_metric = _selection(raw, p, rnd)
    operating_point = raw.get("operating-point")  # absent before operating points existed
    if operating_point is not None:
        try:
            operating_point = OperatingPoint.from_dict(operating_point).as_dict()
        except DataError as exc:
            raise DataError(f"{p}: field 'operating-point': {exc}") from None
    try:
        check_model_kwargs(model, kwargs)
        spec_task = get_spec(model).task
        if spec_task != task:
            raise ModelError(f"model {model!r} solves {spec_task!r}, but 'task' is {task!r}")
        check_state(state, _skeleton_spec(model, kwargs))
    except ModelError as exc:
        raise DataError(
            f"{p} does not describe a model medfed can rebuild: {exc}. Use a checkpoint "
            "written by a medfed run (final_model.pt)."
        ) from None
    return Checkpoint(
        model=model,
        model_kwargs=kwargs,
        task=task,
        state_dict=state,
        round=rnd,
        label_names=list(labels),
        run_config=run_config,
        metrics={k: float(v) for k, v in metrics.items()},
        selected_round=selected_round,
        selection_metric=selection_metric,
        operating_point=operating_point,
    )


def _selection(raw: Mapping[str, Any], p: Path, rnd: int) -> tuple[int | None, str | None]:
    """Check the model-selection fields: both None (or absent), or both set.

    Raises
    ------
    DataError
        A ``selected-round`` other than ``round``, a ``selection-metric`` that is not a
        metric name, or one field set without the other.

    """
    selected = raw.get("selected-round")  # absent before model selection existed
    metric = raw.get("selection-metric")
    if selected is not None and (
        not isinstance(selected, int) or isinstance(selected, bool) or selected != rnd
    ):
        raise _bad(p, "selected-round", selected)
    if metric is not None and (not isinstance(metric, str) or not METRIC_NAME_RE.fullmatch(metric)):
        raise _bad(p, "selection-metric", metric)
    if (selected is None) != (metric is None):
        raise DataError(
            f"{p}: fields 'selected-round' and 'selection-metric' are set together (a model "
            "chosen by model selection) or not at all; it was edited. Use the best_model.pt "
            "of a medfed run."
        )
    return selected, metric


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and check a checkpoint written by :func:`save_checkpoint`.

    The archive's declared sizes are checked before ``torch.load(weights_only=True)``
    (which never runs pickled code); every field, the model arguments and the weights'
    fit to the model are checked after it, all before the model is built.

    Raises
    ------
    DataNotFoundError
        If ``path`` does not exist.
    DataError
        If the file is too large or inflates (:func:`_check_archive`), is not a medfed
        checkpoint of a known version, lacks a field, has a value of the wrong type, an
        unknown model, task or model argument, an out-of-range model argument, or
        weights that do not fit the model. The message names the field and what it
        must be.

    """
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"no checkpoint at {p}")
    _check_archive(p)
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        raise DataError(f"{p} is not a readable medfed checkpoint: {exc}") from exc
    return _parse(raw, p)
