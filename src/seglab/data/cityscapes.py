"""Cityscapes (Cordts et al., CVPR 2016), fine annotations, evaluated on the 19 train classes.

Layout::

    leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png

The stored masks hold the 34 label ids; the benchmark trains and evaluates on 19 of them
(the ``trainId`` column of cityscapesScripts' labels table); every other id is ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from seglab.data.files import UNDEFINED, FileDataset, LabelDecoder

__all__ = ["Cityscapes", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "LABEL_TO_TRAIN_ID"]

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# label id -> train id for the ids that are trained; ids 0..33 not listed here are ignored
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
NUM_LABEL_IDS = 34


def cityscapes_lookup(ignore_index: int = 255) -> np.ndarray:
    table = np.full(256, UNDEFINED, np.int64)
    table[:NUM_LABEL_IDS] = ignore_index
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


class Cityscapes(FileDataset):
    """Cityscapes fine annotations, label ids mapped to the 19 train ids (others -> ignore)."""

    def __init__(self, root: str | Path, split: str = "train", transform: Callable[[dict], dict] | None = None) -> None:
        root = Path(root)
        images_root, masks_root = root / "leftImg8bit" / split, root / "gtFine" / split
        if not images_root.is_dir():
            raise FileNotFoundError(f"Cityscapes split folder {images_root} does not exist")
        pairs, unpaired = [], []
        for image in sorted(images_root.glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            mask = masks_root / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if mask.is_file():
                pairs.append((image, mask))
            else:
                unpaired.append((image, f"has no mask {mask}"))
        decoder = LabelDecoder(cityscapes_lookup())
        super().__init__(pairs, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, decoder, transform, unpaired)
        self.root = root
        self.split = split


def cityscapes_splits(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "leftImg8bit").iterdir() if p.is_dir()) if (root / "leftImg8bit").is_dir() else []
