"""A small DP-ready CNN for 28 x 28 single-channel images (MedMNIST)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks with parameter-free GroupNorm, 3 x 3 average pooling, linear head.

    Designed for DP-SGD, whose cost and noise grow with the number of parameters
    rather than with activations (Tramer & Boneh, "Differentially Private Learning
    Needs Better Features", ICLR 2021):

    - GroupNorm instead of BatchNorm keeps every sample's gradient independent of the
      others, as per-sample clipping requires (Opacus ``ModuleValidator``);
    - the GroupNorm layers have no affine parameters (the next convolution absorbs a
      per-channel scale), so Opacus computes no per-sample gradient for them: these
      were a third of the DP step time, since they need the normalised 28 x 28
      activations again in the backward pass;
    - 3 x 3 average pooling keeps a coarse layout and feeds a single linear layer
      (576 inputs) instead of a 3136-input dense stack.

    About 20 k parameters at ``width=32``. The earlier 93 k-parameter version (affine
    GroupNorm, 128-unit dense head) took 2.1-2.6x the non-DP step time under DP-SGD on
    CPU; this one about 1.6x (``bench/dp_overhead.py``).

    Parameters
    ----------
    in_channels : int
        Image channels ``C``.
    num_classes : int
        Output logits ``K``.
    width : int
        Channels of the first conv block (the second has ``2 * width``).
    groups : int
        GroupNorm groups; must divide ``width``.

    Raises
    ------
    ValueError
        If ``groups`` does not divide ``width``.

    Notes
    -----
    Input ``(N, C, H, W)`` float32 in ``[0, 1]`` (28 x 28 for MedMNIST); output ``(N, K)``
    float32 logits.

    """

    def __init__(
        self, *, in_channels: int = 1, num_classes: int = 2, width: int = 32, groups: int = 8
    ) -> None:
        super().__init__()
        if width % groups:
            raise ValueError(f"width={width} must be divisible by groups={groups}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(groups, width, affine=False),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 x 14
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(groups, 2 * width, affine=False),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7 x 7
            nn.AdaptiveAvgPool2d(3),  # 3 x 3
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 3 * 3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, 28, 28)`` images in ``[0, 1]`` to ``(N, K)`` logits."""
        out: torch.Tensor = self.head(self.features((x - 0.5) / 0.25))
        return out


def build_cnn(*, in_channels: int = 1, num_classes: int = 2, width: int = 32) -> nn.Module:
    """Registry factory for :class:`SmallCNN`."""
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)
