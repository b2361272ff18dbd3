"""Classification metrics computed from labels and predicted probabilities.

Definitions follow scikit-learn (``sklearn.metrics``); AUROC is the area under the ROC
curve of the positive class (Hanley & McNeil 1982), undefined (NaN) when only one class
is present.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm


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
