"""Class imbalance: inverse-frequency class weights and a DP-SGD-safe weighted loss.

Two pieces with a narrow seam between them, so the source of the class counts can change
without touching the loss (issue 13, item 1):

* :func:`balanced_class_weights` -- a count vector ``(K,)`` to weights ``(K,)``. The site
  passes its own training-label counts (run config ``class-weighting = "site"``); the
  planned ``"federation"`` mode passes the federation's counts, securely summed before
  round 1, into the same function.
* :class:`WeightedCrossEntropyLoss` -- cross-entropy whose per-example term is multiplied
  by its class's weight *before* the batch mean, so it stays per-sample separable, which
  Opacus's per-sample gradients need (see its docstring).

Imports numpy and torch only (no MONAI, no Opacus), so both the site and the coordinator
can use it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn
from torch.nn import functional

from common.errors import ConfigError, DataError

#: Default cap on any class weight (run config ``class-weight-max``): a class with a
#: handful of examples at a site would otherwise get a weight in the hundreds.
DEFAULT_MAX_WEIGHT = 10.0


def class_counts(labels: ArrayLike, *, num_classes: int) -> np.ndarray:
    """Count the examples of each class.

    Parameters
    ----------
    labels : array_like
        int ``(N,)`` class indices in ``[0, num_classes)`` (e.g. a memory-mapped split's
        labels).
    num_classes : int
        ``K`` >= 1.

    Returns
    -------
    numpy.ndarray
        int64 ``(K,)``; ``counts[c]`` = number of labels equal to ``c``.

    Raises
    ------
    DataError
        If ``labels`` is not 1-D or holds a value outside ``[0, num_classes)``.

    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(
            f"class counts need image-level labels of shape (N,), got {arr.shape}; class "
            "weighting applies to classification tasks only."
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
        raise DataError(
            f"labels must be in [0, {num_classes}) for num-classes={num_classes}, found "
            f"values in [{int(arr.min())}, {int(arr.max())}]."
        )
    return np.bincount(arr.astype(np.int64, copy=False), minlength=num_classes)


def balanced_class_weights(
    counts: ArrayLike, *, max_weight: float = DEFAULT_MAX_WEIGHT
) -> np.ndarray:
    """Inverse-frequency class weights with mean 1 over examples, capped at ``max_weight``.

    Without the cap, ``w_c = N / (K * n_c)`` with ``n_c`` the count of class ``c``,
    ``N = sum_c n_c`` and ``K`` the number of classes: scikit-learn's
    ``class_weight="balanced"`` heuristic (``compute_class_weight``, after King & Zeng,
    "Logistic regression in rare events data", Political Analysis 9(2), 2001). Every
    class then carries the same total weight ``N / K`` and the mean weight over the
    ``N`` examples, ``sum_c n_c w_c / N``, is exactly 1, so the loss keeps its scale
    and the learning rate and DP clipping norm keep their meaning.

    With the cap, the weights are ``w_c = min(max_weight, lam / n_c)`` with the one
    ``lam`` for which the mean over examples is still exactly 1 ("water-filling"):
    classes too rare for the cap are capped, the others keep inverse-frequency ratios
    among themselves. Because ``max_weight >= 1`` such a ``lam`` always exists. A class
    with count 0 gets ``max_weight`` (it contributes no examples, so it does not change
    the mean).

    Parameters
    ----------
    counts : array_like
        ``(K,)`` non-negative, finite class counts (ints, or floats such as noised
        federation sums), not all zero.
    max_weight : float
        Largest weight any class may get, >= 1 (run config ``class-weight-max``).

    Returns
    -------
    numpy.ndarray
        float64 ``(K,)`` weights; ``sum(counts * weights) == sum(counts)``.

    Raises
    ------
    DataError
        If ``counts`` is not a non-empty 1-D vector of finite non-negative numbers with a
        positive sum.
    ConfigError
        If ``max_weight`` is below 1 or not finite.

    Examples
    --------
    >>> balanced_class_weights([30, 10]).tolist()  # sklearn: 40/(2*30), 40/(2*10)
    [0.6666666666666666, 2.0]
    >>> balanced_class_weights([35, 838], max_weight=10.0).round(4).tolist()
    [10.0, 0.6241]

    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise DataError(
            f"class counts must be a 1-D vector of finite non-negative numbers, got {c!r}."
        )
    total = float(c.sum())
    if total <= 0:
        raise DataError("class counts are all zero: there are no training labels to weight.")
    if not (math.isfinite(max_weight) and max_weight >= 1.0):
        raise ConfigError(
            f"config key 'class-weight-max'={max_weight!r} must be a finite number >= 1 "
            "(1 turns weighting off; 10 is the default)."
        )
    k = c.size
    # Water-filling: cap the m rarest classes; the others share lam = (N - cap * S_m)/(K - m)
    # each (w_c = lam / n_c). The answer is the smallest m whose lam leaves the (m+1)-th
    # rarest class at or under the cap.
    sorted_counts = np.sort(c)
    capped_sum = np.concatenate(([0.0], np.cumsum(sorted_counts)[:-1]))  # S_m, m = 0..K-1
    lam = (total - max_weight * capped_sum) / (k - np.arange(k))
    m = int(np.argmax(lam <= max_weight * sorted_counts))  # the last m always qualifies
    share = lam[m]
    with np.errstate(divide="ignore"):
        weights = np.where(c > 0, share / np.where(c > 0, c, 1.0), max_weight)
    weights = np.minimum(weights, max_weight)
    return weights


class WeightedCrossEntropyLoss(nn.Module):
    """Class-weighted cross-entropy that stays valid under DP-SGD's per-sample clipping.

    ``L = (1 / B) * sum_i w[y_i] * CE(logits_i, y_i)``: the per-example cross-entropy
    (``reduction="none"``) is multiplied by the example's class weight and then averaged
    over the ``B`` examples of the (physical) batch.

    Why not ``torch.nn.CrossEntropyLoss(weight=w)``: its ``"mean"`` reduction divides by
    the *sum of the batch's weights*, ``sum_i w[y_i]``, not by ``B``. Opacus computes
    per-sample gradients by undoing a ``1 / B`` batch mean (``GradSampleModule`` and
    ``make_private(loss_reduction="mean")`` multiply the backpropagated gradients by the
    batch size before the per-sample gradients are formed), so that loss would give example
    ``i`` the gradient ``B * w[y_i] / sum_j w[y_j] * grad_i``: scaled by the labels of the
    *other* examples in its batch. Its clipped contribution would then depend on who else
    was sampled, and DP-SGD's sensitivity analysis (Abadi et al., "Deep learning with
    differential privacy", CCS 2016, Algorithm 1: each example's gradient is computed and
    clipped on its own) no longer holds. Here each example's per-sample gradient is
    exactly ``w[y_i] * grad_i``, a function of that example alone, which Opacus then
    clips to ``max_grad_norm`` like any other (tests/common/test_imbalance.py checks the
    per-sample gradients against manual ones).

    Under DP-SGD the weight acts only on examples whose gradient norm stays below the
    clipping norm after weighting: a gradient that is clipped has norm ``C`` whatever its
    weight. Weights below 1 (the majority class) still shrink small gradients.

    Parameters
    ----------
    weights : torch.Tensor
        float ``(K,)`` class weights, e.g. ``torch.as_tensor(balanced_class_weights(...))``.

    Raises
    ------
    DataError
        If ``weights`` is not a 1-D tensor of finite non-negative values.

    """

    weight: torch.Tensor

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.ndim != 1 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise DataError(
                f"class weights must be a 1-D tensor of finite values >= 0, got {weights!r}."
            )
        self.register_buffer("weight", w.detach().clone())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss.

        Parameters
        ----------
        logits : torch.Tensor
            float ``(B, K)``.
        targets : torch.Tensor
            int64 ``(B,)`` class indices.

        Returns
        -------
        torch.Tensor
            Scalar: the batch mean of ``w[y_i] * CE_i`` (NaN for an empty batch, as
            ``CrossEntropyLoss``).

        """
        per_example = functional.cross_entropy(logits, targets, reduction="none")
        w = self.weight.to(device=per_example.device, dtype=per_example.dtype)
        return (w[targets] * per_example).mean()

    def extra_repr(self) -> str:
        """Show the weights in ``repr``."""
        return f"weights={[round(float(v), 4) for v in self.weight]}"
