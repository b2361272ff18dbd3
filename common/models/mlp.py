"""A small DP-ready multilayer perceptron for tabular site datasets.

Tabular features travel through the site-dataset contract as float32 ``(N, F, 1, 1)``
"images" (task ``tabular``, see :mod:`common.tabular`), so the model flattens its input.
No normalisation layers at all: every sample's gradient is independent of the others, as
DP-SGD's per-sample clipping requires (Opacus ``ModuleValidator`` accepts it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.models import HEART_FEATURES


class TabularMLP(nn.Module):
    """``Flatten -> [Linear -> ReLU] * len(hidden) -> Linear``.

    Parameters
    ----------
    in_features : int
        ``F``, the number of input features, >= 1.
    num_classes : int
        Output logits ``K``, >= 2.
    hidden : Sequence[int]
        Width of each hidden layer; empty gives (multinomial) logistic regression, the
        FLamby Fed-Heart-Disease baseline (a 2-logit softmax equals a sigmoid on their
        difference).

    Notes
    -----
    Input float32 ``(N, F, 1, 1)`` (or ``(N, F)``); output float32 logits ``(N, K)``.

    Raises
    ------
    ValueError
        If a size is < 1 (``num_classes`` < 2).

    """

    def __init__(
        self, *, in_features: int, num_classes: int = 2, hidden: Sequence[int] = (16,)
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features={in_features} must be >= 1")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden={list(hidden)}: every layer width must be >= 1")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, F, 1, 1)`` features to ``(N, K)`` logits."""
        out: torch.Tensor = self.net(x)
        return out


def build_heart_mlp(*, num_classes: int = 2) -> nn.Module:
    """MLP 13 -> 16 -> K for the Fed-Heart-Disease features."""
    return TabularMLP(in_features=HEART_FEATURES, num_classes=num_classes, hidden=(16,))


def build_heart_logreg(*, num_classes: int = 2) -> nn.Module:
    """Logistic regression 13 -> K (FLamby's ``Baseline``)."""
    return TabularMLP(in_features=HEART_FEATURES, num_classes=num_classes, hidden=())
