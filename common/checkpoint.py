"""Self-describing, stable checkpoints of a global model.

A checkpoint is a ``torch.save`` file of plain containers and tensors (loadable with
``torch.load(weights_only=True)``, so loading never executes pickled code)::

    {"format": "medfed-checkpoint", "version": 1,
     "model": "cnn", "model-kwargs": {...}, "task": "classification",
     "label-names": [...] or [], "round": int, "run-config": {...},
     "metrics": {...}, "state-dict": {name: tensor}}

Anyone can rebuild the model from the file alone with :func:`load_checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import DataError, DataNotFoundError
from common.models import get_model
from common.records import check_state, expected_spec

FORMAT = "medfed-checkpoint"
VERSION = 1


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

    def build_model(self) -> nn.Module:
        """Instantiate the registered model and load the weights (strict, checked).

        Raises
        ------
        ModelError
            If the weights do not fit the model's keys, shapes or dtypes.

        """
        model = get_model(self.model, **self.model_kwargs)
        check_state(self.state_dict, expected_spec(model))
        model.load_state_dict(self.state_dict, strict=True)
        model.eval()
        return model


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically (temporary file + ``os.replace``).

    Returns
    -------
    pathlib.Path
        The path written.

    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    tmp.replace(out)
    return out


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    DataNotFoundError
        If ``path`` does not exist.
    DataError
        If the file is not a medfed checkpoint of a known version.

    """
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"no checkpoint at {p}")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        raise DataError(f"{p} is not a readable medfed checkpoint: {exc}") from exc
    if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
        raise DataError(f"{p} is not a medfed checkpoint (no 'format': {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise DataError(f"{p} is checkpoint version {raw.get('version')}, expected {VERSION}")
    return Checkpoint(
        model=str(raw["model"]),
        model_kwargs=dict(raw["model-kwargs"]),
        task=str(raw["task"]),
        state_dict=dict(raw["state-dict"]),
        round=int(raw["round"]),
        label_names=list(raw["label-names"]),
        run_config=dict(raw["run-config"]),
        metrics=dict(raw["metrics"]),
    )
