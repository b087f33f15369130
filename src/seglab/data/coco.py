"""COCO-format data (Lin et al. 2014, "Microsoft COCO: Common Objects in Context").

One annotation file (``instances*.json``) lists images, categories and per-object segmentations
as polygons or run-length encodings; pycocotools decodes both. Two views of the same file:

- :class:`CocoSemantic`: a semantic data set (one class index per pixel), for semantic models;
- :class:`CocoInstances`: torchvision-style instance targets (boxes, labels, one mask per
  object), for Mask R-CNN and YOLACT.

COCO category ids are sparse (1..90 with holes); both views map them, in id order, to
contiguous labels 1..K with 0 = background. Crowd regions (``iscrowd=1``) are marked
``ignore_index`` in semantic masks and left out of instance targets.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from seglab.data.base import SegmentationDataset, default_palette
from seglab.data.instance import make_target
from seglab.data.io import read_image

__all__ = ["CocoInstances", "CocoSemantic", "coco_split_ids", "decode_segmentation"]


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """One object's polygons, uncompressed RLE or compressed RLE -> a bool H x W mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: one flat [x1, y1, x2, y2, ...] list per part
        parts = [p for p in segmentation if len(p) >= 6]
        if not parts:
            return np.zeros((height, width), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(parts, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


def coco_split_ids(image_ids: list[int], split: str | None, val_every: int) -> list[int]:
    """A fixed hold-out split of one annotation file: every ``val_every``-th image (in id order) is val.

    COCO itself ships one file per split (use ``split=None`` then); single-file sets such as
    DSB2018 need a split that is the same on every machine, hence by sorted id, not at random.
    """
    ordered = sorted(image_ids)
    if split is None or split == "all":
        return ordered
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train', 'val', 'all' or None, not {split!r}")
    if val_every < 2:
        raise ValueError(f"val_every must be at least 2, not {val_every}")
    is_val = [(rank % val_every) == val_every - 1 for rank in range(len(ordered))]
    return [i for i, v in zip(ordered, is_val) if v == (split == "val")]


class _CocoFile:
    """The parts both views share: the parsed file, the category mapping, image loading."""

    def __init__(self, annotation_file: str | Path, image_dir: str | Path | None, split: str | None, val_every: int) -> None:
        from pycocotools.coco import COCO

        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotation_file}")
        self.image_dir = Path(image_dir) if image_dir is not None else _guess_image_dir(self.annotation_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.image_dir}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            try:
                self.coco = COCO(str(self.annotation_file))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{self.annotation_file} is not a COCO annotation file ({error})") from None
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of_category = {cat: label for label, cat in enumerate(self.category_ids, start=1)}
        self.category_of_label = {label: cat for cat, label in self.label_of_category.items()}
        self.category_names = tuple(self.coco.cats[c]["name"] for c in self.category_ids)
        self.image_ids = coco_split_ids(list(self.coco.imgs), split, val_every)

    def load_image(self, image_id: int) -> torch.Tensor:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image listed in {self.annotation_file.name} not found: {path}")
        return read_image(path)

    def objects(self, image_id: int) -> list[dict]:
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))

    def mask_of(self, annotation: dict, height: int, width: int) -> np.ndarray:
        """An object's bool H x W mask; an object without one is an error naming it (keypoint and
        box-only files have none)."""
        if "segmentation" not in annotation:
            category = self.coco.cats.get(annotation.get("category_id"), {})
            hint = " (a keypoint file: seglab train --task keypoint)" if category.get("keypoints") else ""
            raise ValueError(f"annotation {annotation.get('id')} in {self.annotation_file.name} has no segmentation to "
                             f"train masks on{hint}")
        return decode_segmentation(annotation["segmentation"], height, width)


def _guess_image_dir(annotation_file: Path) -> Path:
    """``images/`` next to the file (single-file sets), else the COCO layout's ``../<split>2017``
    (for ``annotations/instances_<split>2017.json`` and ``annotations/person_keypoints_<split>2017.json``)."""
    beside = annotation_file.parent / "images"
    if beside.is_dir():
        return beside
    stem = annotation_file.stem.replace("instances_", "").replace("person_keypoints_", "")
    return annotation_file.parent.parent / stem


class CocoSemantic(SegmentationDataset):
    """A COCO annotation file seen as a semantic segmentation data set.

    Args:
        annotation_file: the COCO JSON (e.g. ``annotations/instances_val2017.json``).
        image_dir: folder holding the ``file_name`` of each image; by default ``images/`` next to
            the JSON, else ``../val2017`` for ``annotations/instances_val2017.json``.
        split: ``None``/"all" for every image of the file, or "train"/"val" for a fixed hold-out
            split of a single-file set (see :func:`coco_split_ids`).
        val_every: every ``val_every``-th image (sorted by id) forms the "val" split.

    Where objects overlap, the one listed later in the file wins; crowd regions are ignore_index.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path | None = None,
        split: str | None = None,
        val_every: int = 5,
    ) -> None:
        self.file = _CocoFile(annotation_file, image_dir, split, val_every)
        self.classes = ("background",) + self.file.category_names
        self.palette = default_palette(len(self.classes))

    def __len__(self) -> int:
        return len(self.file.image_ids)

    def image_sizes(self) -> list[tuple[int, int]]:
        """Each image's (width, height) as the annotation file records it (the data doctor
        checks that the files agree)."""
        images = self.file.coco.imgs
        return [(int(images[i]["width"]), int(images[i]["height"])) for i in self.file.image_ids]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_id = self.file.image_ids[index]
        image = self.file.load_image(image_id)
        height, width = image.shape[-2:]
        mask = np.zeros((height, width), np.int64)
        for obj in self.file.objects(image_id):
            region = self.file.mask_of(obj, height, width)
            mask[region] = self.ignore_index if obj.get("iscrowd", 0) else self.file.label_of_category[obj["category_id"]]
        return {"image": image, "mask": torch.from_numpy(mask)}


class CocoInstances(torch.utils.data.Dataset):
    """A COCO annotation file as instance segmentation samples ``(image, target)``.

    ``image`` is a float tv_tensors.Image in [0, 1]; ``target`` holds ``boxes`` (XYXY
    tv_tensors.BoundingBoxes), ``labels`` (int64, 1..K), ``masks`` (uint8 tv_tensors.Mask,
    N x H x W) and ``image_id`` (the COCO id, so predictions can be written back as COCO
    results). Arguments as :class:`CocoSemantic`, plus ``transforms``, a torchvision.transforms.v2
    callable applied jointly to image and target.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path | None = None,
        split: str | None = None,
        val_every: int = 5,
        transforms: Any = None,
    ) -> None:
        self.file = _CocoFile(annotation_file, image_dir, split, val_every)
        self.classes = ("background",) + self.file.category_names
        self.palette = default_palette(len(self.classes))
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def category_of_label(self) -> dict[int, int]:
        """Contiguous label -> the file's COCO category id, to write results the file's tools accept."""
        return self.file.category_of_label

    def __len__(self) -> int:
        return len(self.file.image_ids)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_id = self.file.image_ids[index]
        image = self.file.load_image(image_id)
        height, width = image.shape[-2:]
        objects = [o for o in self.file.objects(image_id) if not o.get("iscrowd", 0)]
        masks = [self.file.mask_of(o, height, width) for o in objects]
        labels = [self.file.label_of_category[o["category_id"]] for o in objects]
        masks_tensor = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.bool)
        sample = (tv_tensors.Image(image), make_target(masks_tensor, torch.tensor(labels, dtype=torch.int64), image_id))
        return self.transforms(*sample) if self.transforms is not None else sample
