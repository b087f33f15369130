"""What every semantic segmentation data set in seglab shares."""
from __future__ import annotations

from typing import Sequence

from torch.utils.data import Dataset

__all__ = ["SegmentationDataset", "default_palette"]


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """The Pascal VOC colour map: distinct, well-known colours for any number of classes."""
    palette = []
    for index in range(num_classes):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


class SegmentationDataset(Dataset):
    """A data set of {"image": float32 C x H x W in [0, 1], "mask": int64 H x W} samples.

    Images are not normalised here: the engine normalises whole batches with the mean and std
    it stores in the checkpoint, so that training, evaluation and prediction agree.
    """

    classes: Sequence[str] = ()
    palette: Sequence[tuple[int, int, int]] = ()
    ignore_index: int = 255
    in_channels: int = 3

    @property
    def num_classes(self) -> int:
        return len(self.classes)
