"""A small DP-ready 2-D U-Net for segmentation (Ronneberger et al., MICCAI 2015).

Equivalent in structure to MONAI's ``UNet`` / ``BasicUNet`` but built only from layers
Opacus computes per-sample gradients for with ``grad_sample_mode="hooks"``: ``Conv2d``,
``GroupNorm`` and parameter-free ``ReLU`` / ``MaxPool2d`` / nearest-neighbour
``Upsample``. MONAI's nets use ``ConvTranspose2d`` (up-sampling) and ``PReLU``
(activation), for which Opacus 1.6 has no grad sampler, so they cannot train under
DP-SGD in hooks mode.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError


def _block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """Two 3 x 3 convolutions, each followed by GroupNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
    )


class UNet2d(nn.Module):
    """Encoder-decoder with skip connections: ``depth`` 2x down-samplings and back.

    Parameters
    ----------
    in_channels : int
        Image channels ``C``.
    num_classes : int
        Output channels ``K`` (segmentation classes including the background).
    width : int
        Channels of the first level; level ``l`` has ``width * 2**l``.
    depth : int
        Number of 2 x 2 max-poolings (input height and width must be divisible by
        ``2**depth``).
    groups : int
        GroupNorm groups; must divide ``width``.

    Raises
    ------
    ConfigError
        If ``groups`` does not divide ``width`` or a size is not positive.

    Notes
    -----
    Input float32 ``(N, C, H, W)`` in ``[0, 1]``; output float32 logits ``(N, K, H, W)``.
    About 0.12 M parameters at ``width=8, depth=3`` (0.49 M at ``width=16``).

    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 8,
        depth: int = 3,
        groups: int = 4,
    ) -> None:
        super().__init__()
        if min(in_channels, num_classes, width, depth, groups) < 1:
            raise ConfigError(
                "U-Net sizes in_channels, num_classes, width, depth and groups must be >= 1"
            )
        if width % groups:
            raise ConfigError(
                f"U-Net width={width} must be divisible by groups={groups}; choose a width "
                f"that is a multiple of {groups}."
            )
        chans = [width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        c_prev = in_channels
        for c in chans:
            self.down.append(_block(c_prev, c, groups))
            c_prev = c
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up = nn.ModuleList(
            _block(chans[level + 1] + chans[level], chans[level], groups)
            for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` images in ``[0, 1]`` to ``(N, K, H, W)`` logits."""
        skips = []
        h = (x - 0.5) / 0.25
        for i, block in enumerate(self.down):
            h = block(h)
            if i < len(self.down) - 1:
                skips.append(h)
                h = self.pool(h)
        for block in self.up:
            h = block(torch.cat([self.upsample(h), skips.pop()], dim=1))
        out: torch.Tensor = self.head(h)
        return out


def build_unet(
    *, in_channels: int = 1, num_classes: int = 2, width: int = 8, depth: int = 3
) -> nn.Module:
    """Registry factory for :class:`UNet2d`."""
    return UNet2d(in_channels=in_channels, num_classes=num_classes, width=width, depth=depth)
