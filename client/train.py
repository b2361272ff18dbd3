"""Local training for one round at one site. No Flower imports: plain PyTorch.

Differential privacy (client/privacy.py) wraps the model, optimizer and loader built
here; the loop itself is the same with and without it (DESIGN section 9, rule 7).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from client.data.torch_dataset import SplitDataset
from common.host_memory import keep_training_buffers_in_heap
from common.site_dataset import SplitArrays

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainStats:
    """What one call of :func:`train_epochs` did.

    Attributes
    ----------
    loss : float
        Mean training cross-entropy over all steps (nats).
    steps : int
        Optimizer steps taken.
    examples : int
        Training examples seen (sum over epochs).
    seconds : float
        Wall time of the loop (s).

    """

    loss: float
    steps: int
    examples: int
    seconds: float


def make_train_loader(
    split: SplitArrays, *, batch_size: int, generator: torch.Generator
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffling loader over a training split, driven by an explicit seeded generator."""
    return DataLoader(
        SplitDataset(split),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=0,
        pin_memory=torch.cuda.is_available(),
    )


def make_optimizer(
    model: nn.Module, *, learning_rate: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Plain SGD with momentum (a fresh optimizer each round, as in FedAvg)."""
    return torch.optim.SGD(
        model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay
    )


def mixed_precision(
    device: torch.device, *, enabled: bool
) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` in bfloat16 on ``device`` when ``enabled``, else a no-op context.

    bfloat16 keeps float32's exponent range, so no gradient scaler is needed (unlike
    float16); parameters and optimizer state stay float32. Supported on CUDA (Ampere and
    newer) and CPU. Not used under DP-SGD (``RunConfig`` refuses ``amp`` with
    ``dp.enabled``): Opacus's per-sample gradients and clipping are not validated there.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_epochs(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    criterion: nn.Module | None = None,
    amp: bool = False,
) -> TrainStats:
    """Run ``epochs`` passes of cross-entropy SGD over ``loader``.

    ``criterion`` replaces the default cross-entropy, e.g. a task's loss or a wrapper
    that adds a regulariser (client/proximal.py ``ProximalLoss`` for FedProx).

    Parameters
    ----------
    model : torch.nn.Module
        Already on ``device``; trained in place.
    loader : DataLoader
        Yields ``(images (B, C, H, W) float32, labels (B,) int64)``; may be an Opacus
        Poisson-sampling loader (batches can be empty).
    optimizer : torch.optim.Optimizer
        Over ``model``'s parameters (possibly an Opacus ``DPOptimizer``).
    epochs : int
        Number of passes, >= 1.
    device : torch.device
        Where batches are moved (non-blocking from pinned memory on CUDA).
    criterion : torch.nn.Module, optional
        ``(outputs, labels) -> scalar`` batch-mean loss; default cross-entropy.
    amp : bool
        Mixed precision: forward pass and loss under ``torch.autocast`` with bfloat16
        (:func:`mixed_precision`); run config ``amp``, allowed only without DP.

    Returns
    -------
    TrainStats

    Raises
    ------
    FloatingPointError
        If the loss becomes NaN or infinite (lower the learning rate).

    """
    keep_training_buffers_in_heap()  # per-step DP buffers: no mmap/munmap churn
    t0 = time.perf_counter()
    model.train()
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    total_loss, steps, examples = 0.0, 0, 0
    for _ in range(epochs):
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with mixed_precision(device, enabled=amp):
                loss = criterion(model(images), labels)
            loss.backward()
            # An empty Poisson batch still takes its (noise-only) DP step, so the
            # accountant's step count matches the sampling that happened.
            optimizer.step()
            if labels.numel() == 0:
                continue
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss became {value} at step {steps}; lower 'learning-rate'."
                )
            total_loss += value
            steps += 1
            examples += int(labels.shape[0])
    return TrainStats(
        loss=total_loss / max(steps, 1),
        steps=steps,
        examples=examples,
        seconds=time.perf_counter() - t0,
    )
