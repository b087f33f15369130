"""Pascal VOC 2012 segmentation (Everingham et al., IJCV 2010).

Layout (``root`` may be ``VOCdevkit``, ``VOCdevkit/VOC2012`` or any folder holding these)::

    JPEGImages/2007_000032.jpg
    SegmentationClass/2007_000032.png        palette PNG: index = class, 255 = ignore (borders)
    ImageSets/Segmentation/{train,val,trainval}.txt
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from seglab.data.base import default_palette
from seglab.data.files import FileDataset, LabelDecoder, index_lookup, read_split_list

__all__ = ["VOCSegmentation", "VOC_CLASSES", "find_voc_root"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def find_voc_root(root: Path) -> Path | None:
    """The folder holding JPEGImages and SegmentationClass, at ``root`` or below it."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
            return candidate
    return None


class VOCSegmentation(FileDataset):
    """Pascal VOC semantic segmentation: 21 classes (background included), 255 = ignore."""

    def __init__(self, root: str | Path, split: str = "train", transform: Callable[[dict], dict] | None = None) -> None:
        voc = find_voc_root(Path(root))
        if voc is None:
            raise FileNotFoundError(f"{root} is not a Pascal VOC folder: no JPEGImages/ and SegmentationClass/ found")
        split_list = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_list.is_file():
            raise FileNotFoundError(f"VOC split list {split_list} does not exist")
        pairs, unpaired = [], []
        for stem in read_split_list(split_list):
            image, mask = voc / "JPEGImages" / f"{stem}.jpg", voc / "SegmentationClass" / f"{stem}.png"
            if not image.is_file():
                unpaired.append((split_list, f"lists {stem!r} but {image} does not exist"))
            elif not mask.is_file():
                unpaired.append((image, f"has no mask {mask}"))
            else:
                pairs.append((image, mask))
        decoder = LabelDecoder(index_lookup(len(VOC_CLASSES)))
        super().__init__(pairs, VOC_CLASSES, default_palette(len(VOC_CLASSES)), decoder, transform, unpaired)
        self.root = voc
        self.split = split


def voc_splits(root: Path) -> list[str]:
    voc = find_voc_root(root)
    folder = voc / "ImageSets" / "Segmentation" if voc else None
    return sorted(p.stem for p in folder.glob("*.txt")) if folder and folder.is_dir() else []
