"""Batched inference and metrics for a model on in-memory or memory-mapped arrays.

Shared by the ClientApp (local validation), the ServerApp (optional held-out evaluation)
and ``medfed evaluate``, so every number in a report comes from the same code. The metric
definitions are in :mod:`common.metrics`; the per-task dispatch
(:meth:`common.tasks.Task.evaluate`) is in :mod:`common.tasks`, which imports this module
(never the other way round).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.config import EVAL_BATCH_SIZE
from common.metrics import classification_metrics, dice_counts, metrics_from_counts


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    device: torch.device,
) -> np.ndarray:
    """Class probabilities of ``model`` for ``images``.

    Parameters
    ----------
    model : torch.nn.Module
        Maps float32 ``(B, C, H, W)`` to ``(B, K)`` logits; put in eval mode here.
    images : numpy.ndarray
        float32 ``(N, C, H, W)`` in ``[0, 1]`` (may be memory-mapped).
    batch_size : int
        Images per forward pass (run config ``eval-batch-size``).
    device : torch.device
        Where to run the model.

    Returns
    -------
    numpy.ndarray
        float64 ``(N, K)`` softmax probabilities.

    """
    model.eval()
    model.to(device)
    out: list[np.ndarray] = []
    for start in range(0, images.shape[0], batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))
        logits = model(batch.to(device=device, dtype=torch.float32, non_blocking=True))
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float64))
    k = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, k))


def metrics_from_proba(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Score a classifier from its predicted probabilities: ``loss`` plus the metrics.

    Parameters
    ----------
    labels : numpy.ndarray
        int ``(N,)``.
    probs : numpy.ndarray
        float ``(N, K)`` from :func:`predict_proba`.

    Returns
    -------
    dict[str, float]
        ``loss`` (mean cross-entropy, nats) and the metrics of
        :func:`common.metrics.classification_metrics`.

    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    metrics = classification_metrics(labels, probs)
    if labels.size:
        picked = np.clip(probs[np.arange(labels.size), labels], 1e-12, 1.0)
        metrics["loss"] = float(-np.mean(np.log(picked)))
    else:
        metrics["loss"] = float("nan")
    return metrics


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    device: torch.device,
    loss: nn.Module,
) -> dict[str, float]:
    """Evaluate a segmentation model: mean ``loss`` per image plus Dice and pixel accuracy.

    Parameters
    ----------
    model : torch.nn.Module
        Maps float32 ``(B, C, H, W)`` to ``(B, K, H, W)`` logits; put in eval mode here.
    images : numpy.ndarray
        float32 ``(N, C, H, W)`` in ``[0, 1]`` (may be memory-mapped).
    masks : numpy.ndarray
        int ``(N, H, W)`` class indices.
    batch_size, device
        As :func:`predict_proba`.
    loss : torch.nn.Module
        The task's training loss (batch mean of a per-image loss).

    Returns
    -------
    dict[str, float]
        ``loss`` and the metrics of :func:`common.metrics.segmentation_metrics`, whose
        pixel counts are accumulated batch by batch (same result as one pass).

    """
    model.eval()
    model.to(device)
    counts: np.ndarray | None = None
    correct = total = 0
    loss_sum = 0.0
    n = int(images.shape[0])
    for start in range(0, n, batch_size):
        x = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))
        y = torch.from_numpy(np.array(masks[start : start + batch_size], dtype=np.int64))
        logits = model(x.to(device=device, non_blocking=True)).float()
        y = y.to(device=device)
        loss_sum += float(loss(logits, y)) * int(y.shape[0])
        pred = logits.argmax(dim=1).cpu().numpy()
        true = y.cpu().numpy()
        batch = dice_counts(true, pred, num_classes=int(logits.shape[1]))
        counts = batch if counts is None else counts + batch
        correct += int(np.sum(pred == true))
        total += int(true.size)
    if counts is None:
        counts = np.zeros((2, 3), dtype=np.int64)
    metrics = metrics_from_counts(counts, correct=correct, total=total, images=n)
    metrics["loss"] = loss_sum / n if n else float("nan")
    return metrics


def evaluate_binary_at(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    thresholds: dict[str, float],
    batch_size: int = EVAL_BATCH_SIZE,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Evaluate a binary classifier once, at one or more decision thresholds.

    Parameters
    ----------
    model : torch.nn.Module
        A two-class classifier (see :func:`predict_proba`).
    images : numpy.ndarray
        float32 ``(N, C, H, W)`` (or ``(N, F)`` for tabular models).
    labels : numpy.ndarray
        int ``(N,)`` in ``{0, 1}``.
    thresholds : dict[str, float]
        ``{name: t}``: predict class 1 when ``P(class 1) >= t``.
    batch_size, device
        As :func:`predict_proba`.

    Returns
    -------
    tuple[dict[str, float], dict[str, dict[str, float]]]
        The threshold-free metrics (``auroc``, ``loss``, ``num-examples``) and, per
        threshold name, :func:`common.operating_point.confusion_at` (counts ``tp``,
        ``fp``, ``tn``, ``fn`` and the rates they imply).

    """
    from common.operating_point import POSITIVE, confusion_at

    probs = predict_proba(model, images, batch_size=batch_size, device=device)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    base = metrics_from_proba(labels, probs)
    free = {k: base[k] for k in ("auroc", "loss", "num-examples")}
    at = {
        name: confusion_at(probs[:, POSITIVE], labels, threshold=t)
        for name, t in thresholds.items()
    }
    return free, at
