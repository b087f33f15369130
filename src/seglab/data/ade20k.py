"""ADE20K as the MIT Scene Parsing Benchmark ships it (Zhou et al., CVPR 2017).

Layout (``root`` may be the ``ADEChallengeData2016`` folder or its parent)::

    images/{training,validation}/ADE_train_00000001.jpg
    annotations/{training,validation}/ADE_train_00000001.png    0 = other, 1..150 = classes

With ``reduce_zero_label`` (the benchmark's protocol, on by default) 0 becomes ignore and
classes 1..150 become 0..149.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from seglab.data.base import default_palette
from seglab.data.files import UNDEFINED, FileDataset, LabelDecoder
from seglab.data.io import images_in

__all__ = ["ADE20K", "ADE20K_CLASSES", "find_ade_root"]

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
_SPLIT_FOLDERS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def find_ade_root(root: Path) -> Path | None:
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images" / "training").is_dir() or (candidate / "images" / "validation").is_dir():
            if (candidate / "annotations").is_dir():
                return candidate
    return None


def ade_lookup(reduce_zero_label: bool, ignore_index: int = 255) -> np.ndarray:
    table = np.full(256, UNDEFINED, np.int64)
    classes = np.arange(len(ADE20K_CLASSES) + 1)
    if reduce_zero_label:
        table[classes] = classes - 1
        table[0] = ignore_index
    else:
        table[classes] = classes
    table[ignore_index] = ignore_index
    return table


class ADE20K(FileDataset):
    """ADE20K scene parsing, 150 classes; ``reduce_zero_label`` ignores "other" (stored 0)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
        reduce_zero_label: bool = True,
    ) -> None:
        ade = find_ade_root(Path(root))
        if ade is None:
            raise FileNotFoundError(f"{root} is not an ADE20K folder: no images/training and annotations/ found")
        if split not in _SPLIT_FOLDERS:
            raise ValueError(f"ADE20K has splits train and val (annotated), not {split!r}")
        images, masks = ade / "images" / _SPLIT_FOLDERS[split], ade / "annotations" / _SPLIT_FOLDERS[split]
        if not images.is_dir():
            raise FileNotFoundError(f"ADE20K split folder {images} does not exist")
        mask_by_stem = {p.stem: p for p in images_in(masks)} if masks.is_dir() else {}
        pairs, unpaired = [], []
        for image in images_in(images):
            if image.stem in mask_by_stem:
                pairs.append((image, mask_by_stem[image.stem]))
            else:
                unpaired.append((image, f"has no mask in {masks}"))
        names = ADE20K_CLASSES if reduce_zero_label else ("other",) + ADE20K_CLASSES
        decoder = LabelDecoder(ade_lookup(reduce_zero_label))
        super().__init__(pairs, names, default_palette(len(names) + 1)[1:] if reduce_zero_label else default_palette(len(names)), decoder, transform, unpaired)
        self.root = ade
        self.split = split


def ade_splits(root: Path) -> list[str]:
    ade = find_ade_root(root)
    return [s for s, folder in (("train", "training"), ("val", "validation")) if ade and (ade / "images" / folder).is_dir()]
