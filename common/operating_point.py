"""A chosen operating point: a binary classifier's threshold from federated validation.

The decision threshold is picked on federated validation from per-class score
histograms (issue 13, item 4).

Each site bins the predicted probability of the positive class ``p = P(y = 1 | x)`` of
its validation images into ``B`` equal bins on ``[0, 1]``, one row per true class
(:func:`score_histogram`, ``(2, B)`` counts). The coordinator receives only the sum over
sites (securely summed under SecAgg+, see :mod:`common.secure_sum`), which is the
histogram of the pooled validation set, so the ROC curve it forms at bin resolution
(:func:`roc_from_histogram`) is the pooled ROC, not an average of the sites' curves
(pooling, not averaging: Swets & Pickett 1982; for federated ROC by summed histograms see
the secure-aggregation setting of Bonawitz et al., CCS 2017). The threshold is then:

``youden``
    the bin edge maximising Youden's J = sensitivity + specificity - 1
    (Youden, "Index for rating diagnostic tests", Cancer 3(1), 1950);
``sensitivity``
    the highest bin edge whose sensitivity is at least ``operating-point-sensitivity``
    (the screening convention: fix the miss rate, then maximise specificity).

A prediction is positive when ``p >= threshold``; at ``threshold = 0.5`` this is the
argmax rule of a two-class softmax (ties go to the positive class). Ratios of counts are
invariant to a common scale, so a histogram known only up to a factor gives the same ROC.

Imports numpy only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.errors import ConfigError, DataError

#: ``operating-point`` values: how the threshold is chosen, or ``none`` (argmax, 0.5).
METHODS = ("youden", "sensitivity", "none")
#: Default number of score bins (threshold resolution 0.01).
DEFAULT_BINS = 100
#: Default ``operating-point-sensitivity`` for the ``sensitivity`` method.
DEFAULT_SENSITIVITY = 0.9
#: The positive class index (pneumonia, malignant...): class 1 of a binary task.
POSITIVE = 1


def score_histogram(scores: ArrayLike, labels: ArrayLike, *, bins: int) -> NDArray[np.float64]:
    """Histogram of positive-class scores per true class.

    Parameters
    ----------
    scores : array_like
        float ``(N,)`` predicted ``P(y = 1)`` in ``[0, 1]``.
    labels : array_like
        int ``(N,)`` true classes in ``{0, 1}``.
    bins : int
        ``B`` >= 2 equal-width bins on ``[0, 1]``; bin ``b`` holds ``b/B <= p < (b+1)/B``
        (``p = 1`` falls in the last bin).

    Returns
    -------
    numpy.ndarray
        float64 ``(2, B)`` counts: row 0 the negatives, row 1 the positives.

    Raises
    ------
    DataError
        If shapes differ, a label is outside ``{0, 1}`` or a score is not in ``[0, 1]``.

    """
    p = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise DataError(f"scores {p.shape} and labels {y.shape} differ in length")
    if bins < 2:
        raise ConfigError(f"config key 'operating-point-bins'={bins} must be >= 2")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise DataError("scores must be probabilities in [0, 1]")
    if y.size and not np.isin(y, (0, 1)).all():
        raise DataError("an operating point needs binary labels in {0, 1}")
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    hist = np.zeros((2, bins), dtype=np.float64)
    np.add.at(hist, (y.astype(np.int64), idx), 1.0)
    return hist


def roc_from_histogram(
    hist: ArrayLike,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ROC curve of a ``(2, B)`` score histogram, at bin resolution.

    Parameters
    ----------
    hist : array_like
        ``(2, B)`` non-negative counts (any common scale), row 1 the positives.

    Returns
    -------
    thresholds, sensitivity, specificity : numpy.ndarray
        float64 ``(B + 1,)`` each: for threshold ``t_j = j / B`` (``j = 0..B``),
        ``sensitivity_j = sum_{b >= j} pos_b / sum pos`` and
        ``specificity_j = sum_{b < j} neg_b / sum neg``.

    Raises
    ------
    DataError
        If the histogram is not ``(2, B)``, holds a negative or non-finite count, or
        lacks one of the classes (the ROC is undefined).

    """
    h = np.asarray(hist, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != 2 or h.shape[1] < 2:
        raise DataError(f"a score histogram is (2, B) with B >= 2, got {h.shape}")
    if not np.all(np.isfinite(h)) or (h < 0).any():
        raise DataError("a score histogram holds counts: finite and >= 0")
    neg, pos = h[0], h[1]
    if neg.sum() <= 0 or pos.sum() <= 0:
        raise DataError("the ROC needs validation images of both classes")
    bins = h.shape[1]
    # tail sums: at threshold j/B, bins j..B-1 are called positive
    pos_at = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    neg_at = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])
    sens = pos_at / pos.sum()
    spec = 1.0 - neg_at / neg.sum()
    return np.arange(bins + 1, dtype=np.float64) / bins, sens, spec


def auroc_from_histogram(hist: ArrayLike) -> float:
    """Area under the bin-resolution ROC (trapezoid rule; ties within a bin count half)."""
    _, sens, spec = roc_from_histogram(hist)
    fpr = 1.0 - spec
    return float(np.sum((fpr[:-1] - fpr[1:]) * (sens[:-1] + sens[1:]) / 2.0))


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and what it achieved on the pooled validation histogram.

    Attributes
    ----------
    threshold : float
        Predict positive when ``P(y = 1) >= threshold``.
    method : str
        ``youden`` or ``sensitivity``.
    sensitivity, specificity : float
        At ``threshold`` on the pooled validation histogram (bin resolution).
    auroc : float
        Of the pooled histogram (bin resolution).
    bins : int
        Histogram resolution ``B``.
    validation_examples : float
        Images in the pooled histogram.
    round : int
        The round whose global model was validated (-1 if unknown).
    target_sensitivity : float or None
        The ``sensitivity`` method's target.
    """

    threshold: float
    method: str
    sensitivity: float
    specificity: float
    auroc: float
    bins: int
    validation_examples: float
    round: int = -1
    target_sensitivity: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain ``dict`` for a checkpoint or the round log (``None`` dropped)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> OperatingPoint:
        """Parse :meth:`as_dict`'s output, e.g. from a checkpoint.

        Raises
        ------
        DataError
            If a field is missing or of the wrong type, or the threshold is not in
            ``[0, 1]``.
        """
        if not isinstance(data, dict):
            raise DataError("operating_point must be a mapping")
        try:
            op = cls(
                threshold=float(data["threshold"]),
                method=str(data["method"]),
                sensitivity=float(data["sensitivity"]),
                specificity=float(data["specificity"]),
                auroc=float(data["auroc"]),
                bins=int(data["bins"]),
                validation_examples=float(data["validation_examples"]),
                round=int(data.get("round", -1)),
                target_sensitivity=(
                    None
                    if data.get("target_sensitivity") is None
                    else float(data["target_sensitivity"])
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"operating_point is malformed: {exc}") from None
        if not 0.0 <= op.threshold <= 1.0 or not math.isfinite(op.threshold):
            raise DataError(f"operating_point threshold {op.threshold} is not in [0, 1]")
        return op


def choose_threshold(
    hist: ArrayLike,
    *,
    method: str = "youden",
    target_sensitivity: float = DEFAULT_SENSITIVITY,
    server_round: int = -1,
) -> OperatingPoint:
    """Pick the decision threshold on a pooled ``(2, B)`` score histogram.

    Parameters
    ----------
    hist : array_like
        ``(2, B)`` counts (:func:`score_histogram`, summed over sites).
    method : str
        ``youden``: maximise J = sensitivity + specificity - 1 (ties: the threshold
        closest to 0.5); ``sensitivity``: the highest threshold with sensitivity >=
        ``target_sensitivity``.
    target_sensitivity : float
        In ``(0, 1]``; used by ``sensitivity``.
    server_round : int
        Recorded in the result.

    Returns
    -------
    OperatingPoint

    Raises
    ------
    ConfigError
        For an unknown method or a target outside ``(0, 1]``.
    DataError
        From :func:`roc_from_histogram`.

    """
    thresholds, sens, spec = roc_from_histogram(hist)
    if method == "youden":
        j = sens + spec - 1.0
        best = np.flatnonzero(np.isclose(j, j.max(), rtol=0.0, atol=1e-12))
        pick = int(best[np.argmin(np.abs(thresholds[best] - 0.5))])
        target = None
    elif method == "sensitivity":
        if not 0.0 < target_sensitivity <= 1.0:
            raise ConfigError(
                f"config key 'operating-point-sensitivity'={target_sensitivity} must be in (0, 1]"
            )
        ok = np.flatnonzero(sens >= target_sensitivity - 1e-12)
        pick = int(ok.max())  # sensitivity is 1 at threshold 0, so ok is never empty
        target = float(target_sensitivity)
    else:
        raise ConfigError(f"operating-point method {method!r} is not one of {METHODS[:2]}")
    h = np.asarray(hist, dtype=np.float64)
    return OperatingPoint(
        threshold=float(thresholds[pick]),
        method=method,
        sensitivity=float(sens[pick]),
        specificity=float(spec[pick]),
        auroc=auroc_from_histogram(h),
        bins=int(h.shape[1]),
        validation_examples=float(h.sum()),
        round=server_round,
        target_sensitivity=target,
    )


def confusion_at(scores: ArrayLike, labels: ArrayLike, *, threshold: float) -> dict[str, float]:
    """Binary confusion matrix and the metrics it implies at ``threshold``.

    Parameters
    ----------
    scores : array_like
        float ``(N,)`` ``P(y = 1)``.
    labels : array_like
        int ``(N,)`` in ``{0, 1}``.
    threshold : float
        Positive when ``score >= threshold``.

    Returns
    -------
    dict[str, float]
        ``tp``, ``fp``, ``tn``, ``fn`` (counts), ``accuracy``, ``balanced-accuracy``,
        ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``f1``; undefined ratios NaN.

    """
    p = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) == POSITIVE
    pred = p >= threshold
    tp, fp = float(np.sum(pred & y)), float(np.sum(pred & ~y))
    tn, fn = float(np.sum(~pred & ~y)), float(np.sum(~pred & y))

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    sens, spec = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "balanced-accuracy": (sens + spec) / 2.0,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }
