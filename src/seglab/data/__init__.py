"""Data sets: the built-in synthetic shapes and the standard on-disk formats."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from seglab.data.ade20k import ADE20K, find_ade_root
from seglab.data.base import SegmentationDataset, default_palette
from seglab.data.camvid import CamVid
from seglab.data.cityscapes import Cityscapes
from seglab.data.coco import CocoSemantic
from seglab.data.files import FileDataset, TransformedDataset
from seglab.data.folder import FolderDataset, split_folders
from seglab.data.synthetic import SyntheticShapes
from seglab.data.transforms import build_transform
from seglab.data.voc import VOCSegmentation, find_voc_root

__all__ = [
    "SegmentationDataset",
    "SyntheticShapes",
    "FileDataset",
    "FolderDataset",
    "VOCSegmentation",
    "CamVid",
    "Cityscapes",
    "ADE20K",
    "CocoSemantic",
    "FORMATS",
    "default_palette",
    "detect_format",
    "open_dataset",
    "build_transform",
]

FORMATS: dict[str, Callable[..., FileDataset]] = {
    "folder": FolderDataset,
    "voc": VOCSegmentation,
    "camvid": CamVid,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
}
# options the trainer passes for the synthetic set; real data sets take their classes from disk
_SYNTHETIC_ONLY = ("num_samples", "num_classes", "seed", "max_objects")


def detect_format(path: str | Path) -> str:
    """Name the format of a data set folder from its layout."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data set folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"data set path {root} is a file; give the data set folder")
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if find_voc_root(root) is not None:
        return "voc"
    if find_ade_root(root) is not None:
        return "ade20k"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folder"
    if _coco_annotation_file(root, "train") is not None:
        return "coco"
    if any((root / f"{split}annot").is_dir() for split in ("train", "val", "test")):
        return "camvid"
    if split_folders(root):
        return "folder"
    if root.name in ("images", "masks") and (root.parent / "images").is_dir() and (root.parent / "masks").is_dir():
        raise ValueError(f"{root} is the data set's {root.name}/ folder; give the folder that holds images/ and masks/, "
                         f"{root.parent}")
    raise ValueError(
        f"cannot tell the format of {root}: expected images/ + masks/ or train/images/ + train/masks/ (folder), "
        "JPEGImages/ + SegmentationClass/ "
        "(voc), train/ + trainannot/ (camvid), leftImg8bit/ + gtFine/ (cityscapes) or ADEChallengeData2016 "
        "(ade20k); choose with --format (format= in Python)"
    )


def open_dataset(
    source: str | Path = "synthetic",
    split: str = "train",
    format: str | None = None,
    image_size: int | Sequence[int] | None = None,
    augment: Mapping[str, Any] | bool | None = None,
    **options: Any,
) -> SegmentationDataset:
    """Open a data set by name or path.

    Args:
        source: ``"synthetic"`` for the built-in shapes, or a data set folder.
        split: "train", "val" or "test".
        format: one of :data:`FORMATS`, or None to detect it from the folder layout.
        image_size: int or [h, w]. Training: the random-crop size (or resize target without
            scale augmentation); evaluation: resize target, None for native size. For the
            synthetic set: its image side (or [h, w]).
        augment: augmentation config (see :mod:`seglab.data.transforms`); None = the default
            for "train", none otherwise. The synthetic set ignores it.
        options: for ``"synthetic"``, those of :class:`SyntheticShapes` (``num_samples``,
            ``num_classes``, ``seed``); for folders, those of the format's class (e.g.
            ``classes=`` for the folder format); the synthetic-only ones are ignored there.
    """
    if str(source) == "synthetic":
        if image_size is not None:
            options["image_size"] = image_size
        return SyntheticShapes(split=split, **options)
    root = Path(source)
    if format is None and root.suffix == ".json":
        format = "coco"
    fmt = detect_format(source) if format is None else format.lower()
    if fmt == "coco":
        return _open_coco(root, split, image_size, augment, **options)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data set format {format!r}; known formats: {', '.join(FORMATS)}, coco")
    if not root.is_dir():
        raise FileNotFoundError(f"data set folder {root} does not exist")
    dataset_class = FORMATS[fmt]
    format_options = {k: v for k, v in options.items() if k not in _SYNTHETIC_ONLY}
    accepted = set(inspect.signature(dataset_class.__init__).parameters) - {"self", "root", "split", "transform"}
    unknown = set(format_options) - accepted
    if unknown:
        raise ValueError(f"option(s) {', '.join(sorted(unknown))} are not understood by the {fmt} format")
    dataset = dataset_class(root, split, **format_options)
    dataset.transform = build_transform(augment, image_size, train=split == "train", ignore_index=dataset.ignore_index)
    return dataset


def _coco_annotation_file(root: Path, split: str) -> tuple[Path, str | None] | None:
    """The COCO JSON for ``split`` and the hold-out split to take from it (None: the whole file).

    COCO's own layout has one file per split (annotations/instances_<split>2017.json); a
    single-file set (one JSON beside images/, like DSB2018) is split by a fixed hold-out.
    """
    if root.is_file():
        return root, split
    per_split = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if per_split:
        return per_split[0], None
    single = sorted(root.glob("*.json"))
    if len(single) == 1 and (root / "images").is_dir():
        return single[0], split
    return None


def _open_coco(
    root: Path, split: str, image_size: int | Sequence[int] | None, augment: Mapping[str, Any] | bool | None, **options: Any
) -> SegmentationDataset:
    if not root.exists():
        raise FileNotFoundError(f"COCO data set {root} does not exist")
    found = _coco_annotation_file(root, split)
    if found is None:
        raise FileNotFoundError(f"no COCO annotation file for split {split!r} under {root} (annotations/instances_{split}*.json or one *.json beside images/)")
    annotation_file, holdout = found
    coco_options = {k: v for k, v in options.items() if k not in _SYNTHETIC_ONLY}
    unknown = set(coco_options) - {"image_dir", "val_every"}
    if unknown:
        raise ValueError(f"option(s) {', '.join(sorted(unknown))} are not understood by the coco format")
    dataset = CocoSemantic(annotation_file, split=holdout, **coco_options)
    return TransformedDataset(dataset, build_transform(augment, image_size, train=split == "train", ignore_index=dataset.ignore_index))
