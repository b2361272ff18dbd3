"""Local training for one round at one site. No Flower imports: plain PyTorch.

Differential privacy (client/privacy.py) wraps the model, optimizer and loader built
here; the loop itself is the same with and without it (DESIGN section 9, rule 7).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from client.data.torch_dataset import SplitDataset
from common.errors import DataError
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


#: Bytes of the memory-mapped images checked at a time by :func:`check_finite_images`.
_FINITE_CHECK_CHUNK_BYTES = 64 * 1024**2


def check_finite_images(split: SplitArrays) -> None:
    """Refuse a split whose images hold a NaN or an infinite value.

    One such image makes every step's loss NaN, and under DP-SGD every step taken
    before training stops is charged to the site's privacy ledger. The whole images
    array, float32 ``(N, C, H, W)`` and usually memory-mapped, is checked with
    ``torch.isfinite`` in chunks of about 64 MiB, so the check costs one read of the
    split and little memory.

    Parameters
    ----------
    split : SplitArrays
        The split to be trained on.

    Raises
    ------
    DataError
        With the number of non-finite images (never their values) and what to do:
        re-ingest the DICOM export, which quarantines such files.

    """
    images = split.images
    n = int(images.shape[0])
    if n == 0:
        return
    per_image = max(1, int(np.prod(images.shape[1:], dtype=np.int64)) * images.itemsize)
    step = max(1, _FINITE_CHECK_CHUNK_BYTES // per_image)
    bad = 0
    for start in range(0, n, step):
        chunk = torch.from_numpy(np.array(images[start : start + step], dtype=np.float32))
        bad += int((~torch.isfinite(chunk).reshape(chunk.shape[0], -1).all(dim=1)).sum())
    if bad:
        raise DataError(
            f"{bad} of {n} training images hold NaN or infinite values, so every training "
            "step would fail (and under DP still be charged to the privacy ledger); "
            "nothing was trained. Re-ingest the DICOM export with this medfed version "
            "(`medfed ingest ... --force`), which quarantines such files as bad_lut or "
            "non_finite_pixels, or rebuild the site dataset."
        )


def make_train_loader(
    split: SplitArrays, *, batch_size: int, generator: torch.Generator
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffling loader over a training split, driven by an explicit seeded generator.

    The split's images are checked first (:func:`check_finite_images`): the loader is
    built before any DP engine, budget check or ledger is touched (client/site/handlers.py
    ``train_content``), so a non-finite site dataset is refused with no privacy spent.

    Raises
    ------
    DataError
        If an image holds a NaN or infinite value.

    """
    check_finite_images(split)
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
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
    augment : Callable, optional
        Applied to each batch's images on ``device`` before the forward pass,
        ``(B, C, H, W) -> (B, C, H, W)`` (client/augment.py, run config ``augment``);
        under DP-SGD each augmented example's gradient is clipped on its own.

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
            if augment is not None:
                images = augment(images)
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
