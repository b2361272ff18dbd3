"""Explicit device selection (node config ``device``: auto, cpu, cuda, cuda:N)."""

from __future__ import annotations

import torch

from common.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a device string into a ``torch.device``.

    Parameters
    ----------
    name : str
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ConfigError
        If CUDA is asked for but not available, or the index does not exist.

    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} requested but CUDA is not available here; use 'cpu' or 'auto'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)."
            )
    return dev
