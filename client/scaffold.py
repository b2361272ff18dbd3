"""SCAFFOLD at the site: the client control variate, the drift correction, its update.

SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1) corrects client drift under non-IID data. Every local
step uses ``g(y) - c_i + c`` instead of ``g(y)``, where ``c`` is the server's control
variate (sent with the global model) and ``c_i`` the site's own. After ``K`` local steps
with learning rate ``eta`` the site updates its variate with option II::

    c_i+ = c_i - c + (x - y_i) / (K * eta)

and replies with ``delta_c_i = c_i+ - c_i`` next to its model. ``c_i`` belongs to the
site: it is kept in the site's ``state-dir`` (each ClientApp message may run in a fresh
process), keyed by the dataset fingerprint (as the privacy ledger), written atomically.

Variates cover the trainable parameters only (not buffers), float32, on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from common.fsutil import atomic_write

log = logging.getLogger(__name__)

#: Server control variate in the train message; the site's delta in its reply.
SERVER_RECORD = "scaffold-c"
DELTA_RECORD = "scaffold-dc"

Variate = dict[str, torch.Tensor]


# The reply's delta is checked by the egress guard's explicit schema (client/egress.py
# PROTOCOL_RECORDS, only with strategy = scaffold, against the trainable parameters of
# the message's model, client/site/job.py): nothing is registered on import.


def zeros_like_params(model: nn.Module) -> Variate:
    """Return a zero control variate for the trainable parameters of ``model``."""
    return {n: torch.zeros_like(p, device="cpu") for n, p in model.named_parameters()}


def variate_path(state_dir: Path, key: str) -> Path:
    """File of the site's control variate for one project/dataset ``key``."""
    safe = key.replace("/", "--")
    return Path(state_dir) / f"scaffold-{safe}.pt"


def load_variate(path: Path, model: nn.Module) -> Variate:
    """Return the site's ``c_i`` (zeros on first participation)."""
    if not path.is_file():
        return zeros_like_params(model)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    expected = zeros_like_params(model)
    if set(loaded) != set(expected) or any(loaded[k].shape != expected[k].shape for k in expected):
        log.warning("stored SCAFFOLD control variate does not fit the model; starting at 0")
        return expected
    return {k: v.float() for k, v in loaded.items()}


def save_variate(path: Path, variate: Variate) -> None:
    """Write ``c_i`` atomically, ``0600`` in a ``0700`` state dir whatever the umask."""
    state = {k: v.detach().cpu().contiguous() for k, v in variate.items()}
    atomic_write(path, lambda fh: torch.save(state, fh))


@contextlib.contextmanager
def drift_correction(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, c: Variate, c_i: Variate
) -> Iterator[None]:
    """Add ``c - c_i`` to every parameter's gradient just before each optimizer step.

    Implemented as an optimizer step pre-hook, so the training loop itself is unchanged.
    """
    correction = {n: (c[n] - c_i[n]) for n in c}
    params = dict(model.named_parameters())
    on_device = {n: correction[n].to(params[n].device) for n in correction}

    def hook(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for name, p in params.items():
            if p.grad is not None:
                p.grad.add_(on_device[name])

    handle = optimizer.register_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def updated_variate(
    *, c: Variate, c_i: Variate, x: Variate, y: Variate, steps: int, learning_rate: float
) -> Variate:
    """Option II of Karimireddy et al. (2020): ``c_i - c + (x - y) / (K * eta)``.

    Parameters
    ----------
    c, c_i : dict of tensors
        Server and site control variates.
    x, y : dict of tensors
        Global parameters received and local parameters after training.
    steps : int
        Local optimizer steps ``K`` (>= 1; with 0 steps ``c_i`` is returned unchanged).
    learning_rate : float
        Local learning rate ``eta``.
    """
    if steps < 1:
        return {k: v.clone() for k, v in c_i.items()}
    scale = 1.0 / (steps * learning_rate)
    return {k: c_i[k] - c[k] + (x[k] - y[k]) * scale for k in c_i}


class ScaffoldRound:
    """One SCAFFOLD round at a site: load ``c_i``, correct the steps, save, reply delta.

    Parameters
    ----------
    model : torch.nn.Module
        The model holding the received global weights ``x`` (before training).
    c : Variate
        The server control variate from the train message.
    path : pathlib.Path
        Where the site keeps ``c_i`` (:func:`variate_path`).
    """

    def __init__(self, model: nn.Module, *, c: Variate, path: Path) -> None:
        self.path = path
        self.c = c
        self.c_i = load_variate(path, model)
        self.x = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        missing = set(self.c_i) - set(c)
        if missing:
            raise ValueError(f"server control variate lacks parameters {sorted(missing)[:3]}")

    def correction(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        """Context manager that applies ``c - c_i`` at every step (:func:`drift_correction`)."""
        return drift_correction(model, optimizer, c=self.c, c_i=self.c_i)

    def finish(self, model: nn.Module, *, steps: int, learning_rate: float) -> ArrayRecord:
        """Update and save ``c_i``; return ``delta_c_i`` as the reply's ``ArrayRecord``."""
        y = {n: p.detach().cpu() for n, p in model.named_parameters()}
        new = updated_variate(
            c=self.c, c_i=self.c_i, x=self.x, y=y, steps=steps, learning_rate=learning_rate
        )
        save_variate(self.path, new)
        return ArrayRecord(
            {k: Array(np.asarray(new[k] - self.c_i[k], dtype=np.float32)) for k in new}
        )
