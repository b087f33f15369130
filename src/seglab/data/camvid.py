"""CamVid (Brostow et al. 2009) as the SegNet tutorial distributes it (Badrinarayanan et al. 2017).

Layout::

    train/ val/ test/                 RGB PNG images, 480 x 360
    trainannot/ valannot/ testannot/  index PNGs, values 0..11
    train.txt val.txt test.txt        "image mask" pairs with absolute paths (/SegNet/CamVid/...)

The pair lists name files under the SegNet authors' machine, so each path is re-rooted: its
last two parts (folder/file) are looked up under ``root``. Without a list the split folders
are paired by file name. 11 classes; stored value 11 (Unlabelled) is ignored, as in SegNet.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from seglab.data.files import FileDataset, LabelDecoder, index_lookup, read_split_list
from seglab.data.io import images_in

__all__ = ["CamVid", "CAMVID_CLASSES", "CAMVID_PALETTE", "UNLABELLED"]

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
# camvid11.png, the SegNet tutorial's colour table
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)
UNLABELLED = 11


def camvid_lookup(ignore_index: int = 255) -> np.ndarray:
    table = index_lookup(len(CAMVID_CLASSES), ignore_index)
    table[UNLABELLED] = ignore_index
    return table


class CamVid(FileDataset):
    """CamVid in the SegNet layout: 11 classes, Unlabelled (11) -> ignore_index."""

    def __init__(self, root: str | Path, split: str = "train", transform: Callable[[dict], dict] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"CamVid folder {root} does not exist")
        split_list = root / f"{split}.txt"
        if split_list.is_file():
            pairs, unpaired = _pairs_from_list(root, split_list)
        elif (root / split).is_dir() and (root / f"{split}annot").is_dir():
            pairs, unpaired = _pairs_from_folders(root / split, root / f"{split}annot")
        else:
            raise FileNotFoundError(f"CamVid split {split!r} not found: no {split_list} and no {split}/ + {split}annot/ in {root}")
        decoder = LabelDecoder(camvid_lookup())
        super().__init__(pairs, CAMVID_CLASSES, CAMVID_PALETTE, decoder, transform, unpaired)
        self.root = root
        self.split = split


def reroot(listed: str, root: Path) -> Path:
    """``/SegNet/CamVid/train/x.png`` -> ``root/train/x.png`` (keep the last two parts)."""
    parts = PurePosixPath(listed.replace("\\", "/")).parts
    return root.joinpath(*parts[-2:])


def _pairs_from_list(root: Path, split_list: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    pairs, unpaired = [], []
    for number, line in enumerate(read_split_list(split_list), start=1):
        fields = line.split()
        if len(fields) != 2:
            unpaired.append((split_list, f"line {number} should hold an image and a mask path: {line!r}"))
            continue
        image, mask = reroot(fields[0], root), reroot(fields[1], root)
        if not image.is_file():
            unpaired.append((split_list, f"line {number}: image {image} does not exist"))
        elif not mask.is_file():
            unpaired.append((image, f"has no mask {mask} (line {number} of {split_list.name})"))
        else:
            pairs.append((image, mask))
    return pairs, unpaired


def _pairs_from_folders(images: Path, masks: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    by_name = {p.name: p for p in images_in(masks)}
    pairs = [(p, by_name[p.name]) for p in images_in(images) if p.name in by_name]
    paired = {image.name for image, _ in pairs}
    unpaired = [(p, f"has no mask in {masks}") for p in images_in(images) if p.name not in paired]
    unpaired += [(p, f"has no image in {images}") for name, p in by_name.items() if name not in paired]
    return pairs, unpaired


def camvid_splits(root: Path) -> list[str]:
    return [s for s in ("train", "val", "test") if (root / f"{s}.txt").is_file() or (root / f"{s}annot").is_dir()]
