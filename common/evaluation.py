"""Batched inference and metrics for a model on in-memory or memory-mapped arrays.

Shared by the ClientApp (local validation), the ServerApp (optional held-out evaluation)
and ``medfed evaluate``, so every number in a report comes from the same code.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.metrics import classification_metrics


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 256,
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
        Images per forward pass.
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


def evaluate_arrays(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 256,
    device: torch.device,
) -> dict[str, float]:
    """Evaluate a classifier: cross-entropy ``loss`` plus :func:`classification_metrics`.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier (see :func:`predict_proba`).
    images : numpy.ndarray
        float32 ``(N, C, H, W)``.
    labels : numpy.ndarray
        int ``(N,)``.
    batch_size : int
        Images per forward pass.
    device : torch.device
        Where to run the model.

    Returns
    -------
    dict[str, float]
        ``loss`` (mean cross-entropy, nats) and the metrics of
        :func:`common.metrics.classification_metrics`.

    """
    probs = predict_proba(model, images, batch_size=batch_size, device=device)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    metrics = classification_metrics(labels, probs)
    if labels.size:
        picked = np.clip(probs[np.arange(labels.size), labels], 1e-12, 1.0)
        metrics["loss"] = float(-np.mean(np.log(picked)))
    else:
        metrics["loss"] = float("nan")
    return metrics
