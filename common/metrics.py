"""Metrics computed from labels and predictions (numpy only, no model, no torch).

Classification: definitions follow scikit-learn (``sklearn.metrics``); AUROC is the area
under the ROC curve of the positive class (Hanley & McNeil 1982), undefined (NaN) when
only one class is present. Segmentation: Dice and pixel accuracy from per-class pixel
counts that sum over batches (:func:`dice_counts`, :func:`metrics_from_counts`).

Layering: ``common.metrics`` <- ``common.evaluation`` (batched inference) <-
``common.tasks`` (the task registry and :meth:`common.tasks.Task.evaluate`); no module
imports one above it.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

from common.errors import DataError


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, *, positive: int = 1
) -> dict[str, float]:
    """Binary or multi-class metrics for a set of predictions.

    Parameters
    ----------
    labels : numpy.ndarray
        int ``(N,)`` true class indices.
    probs : numpy.ndarray
        float ``(N, K)`` class probabilities (rows sum to 1).
    positive : int
        Index of the positive class for sensitivity, specificity, F1 and AUROC when
        ``K == 2``.

    Returns
    -------
    dict[str, float]
        ``accuracy``, ``balanced-accuracy``, ``auroc``, ``sensitivity`` (recall of the
        positive class), ``specificity`` (recall of the others), ``f1`` and
        ``num-examples``. Undefined values are NaN.

    """
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    n = int(labels.shape[0])
    if n == 0:
        nan = math.nan
        return {
            "accuracy": nan,
            "balanced-accuracy": nan,
            "auroc": nan,
            "sensitivity": nan,
            "specificity": nan,
            "f1": nan,
            "num-examples": 0.0,
        }
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    pos_true, pos_pred = labels == positive, pred == positive
    tp = float(np.sum(pos_true & pos_pred))
    fn = float(np.sum(pos_true & ~pos_pred))
    tn = float(np.sum(~pos_true & ~pos_pred))
    fp = float(np.sum(~pos_true & pos_pred))
    present = np.unique(labels)
    if present.size < 2:
        auroc = math.nan
    elif k == 2:
        auroc = float(skm.roc_auc_score(pos_true, probs[:, positive]))
    else:
        auroc = float(skm.roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(k))))
    with np.errstate(invalid="ignore"):
        recalls = [float(np.mean(pred[labels == c] == c)) for c in present]
    return {
        "accuracy": float(np.mean(pred == labels)),
        "balanced-accuracy": float(np.mean(recalls)),
        "auroc": auroc,
        "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
        "specificity": tn / (tn + fp) if tn + fp else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan,
        "num-examples": float(n),
    }


def segmentation_metrics(
    true: np.ndarray, pred: np.ndarray, *, num_classes: int
) -> dict[str, float]:
    """Dice and pixel accuracy of predicted label maps, pooled over all pixels.

    Parameters
    ----------
    true, pred : numpy.ndarray
        int ``(N, H, W)`` class indices in ``[0, num_classes)``.
    num_classes : int
        ``K`` >= 2; class 0 is the background.

    Returns
    -------
    dict[str, float]
        ``dice``: mean over foreground classes ``c >= 1`` of
        ``2 TP_c / (2 TP_c + FP_c + FN_c)`` with the counts summed over every pixel of
        every image (micro / "global" Dice, Dice 1945; Sorensen 1948) -- NaN for a class
        absent from both ``true`` and ``pred``; ``dice-<c>`` per foreground class when
        ``K > 2``; ``pixel-accuracy``: share of pixels with ``pred == true``;
        ``num-examples``: ``N``.

    Raises
    ------
    DataError
        If the shapes differ.

    """
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise DataError(f"masks {true.shape} and predictions {pred.shape} differ in shape")
    counts = dice_counts(true, pred, num_classes=num_classes)
    return metrics_from_counts(
        counts,
        correct=int(np.sum(true == pred)),
        total=true.size,
        images=int(true.shape[0]) if true.ndim else 0,
    )


def dice_counts(true: np.ndarray, pred: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Pixel counts per class: int64 ``(K, 3)`` with columns TP, FP, FN."""
    out = np.zeros((num_classes, 3), dtype=np.int64)
    for c in range(num_classes):
        t, p = true == c, pred == c
        out[c] = (np.sum(t & p), np.sum(~t & p), np.sum(t & ~p))
    return out


def metrics_from_counts(
    counts: np.ndarray, *, correct: int, total: int, images: int
) -> dict[str, float]:
    """Metrics of :func:`segmentation_metrics` from :func:`dice_counts` (summable per batch).

    Parameters
    ----------
    counts : numpy.ndarray
        int ``(K, 3)`` TP, FP, FN per class.
    correct, total : int
        Pixels predicted right, and all pixels.
    images : int
        Images the counts cover.

    """
    dice = []
    for tp, fp, fn in counts[1:]:
        denom = 2 * tp + fp + fn
        dice.append(2.0 * tp / denom if denom else math.nan)
    out = {
        "dice": float(np.nanmean(dice)) if any(not math.isnan(d) for d in dice) else math.nan,
        "pixel-accuracy": correct / total if total else math.nan,
        "num-examples": float(images),
    }
    if len(dice) > 1:
        out |= {f"dice-{c + 1}": d for c, d in enumerate(dice)}
    return out
