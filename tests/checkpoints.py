"""Tiny medfed checkpoints for tests, written through the real ``save_checkpoint`` API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from common.models import get_model, get_spec


def tiny_checkpoint(
    path: Path,
    model: str = "cnn",
    *,
    seed: int = 0,
    round_: int = 3,
    run_config: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    **model_kwargs: Any,
) -> Checkpoint:
    """Save a freshly initialised (seeded) ``model`` at ``path`` and return it re-loaded.

    The default ``cnn`` is built with ``width=8`` to keep tests fast.
    """
    if model == "cnn":
        model_kwargs.setdefault("width", 8)
    torch.manual_seed(seed)
    net = get_model(model, **model_kwargs)
    save_checkpoint(
        path,
        Checkpoint(
            model=model,
            model_kwargs=model_kwargs,
            task=get_spec(model).task,
            state_dict=net.state_dict(),
            round=round_,
            label_names=["normal", "pneumonia"],
            run_config=dict(run_config or {}),
            metrics=dict(metrics or {}),
        ),
    )
    return load_checkpoint(path)
