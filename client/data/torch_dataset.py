"""A torch ``Dataset`` over one split of a site dataset (memory-mapped arrays)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from common.site_dataset import SplitArrays


class SplitDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Items ``(image, label)`` of one split.

    Parameters
    ----------
    split : SplitArrays
        Arrays from :meth:`common.site_dataset.SiteDataset.load`.

    Notes
    -----
    ``image`` is float32 ``(C, H, W)`` in ``[0, 1]``; ``label`` is an int64 scalar
    (classification) or an int64 ``(H, W)`` mask (segmentation).
    Reads one image at a time from the memory map, so a site's dataset need not fit RAM.

    """

    def __init__(self, split: SplitArrays) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.split.images[index], dtype=np.float32))
        label = torch.from_numpy(np.array(self.split.labels[index], dtype=np.int64))
        return image, label
