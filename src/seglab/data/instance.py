"""Instance segmentation samples in torchvision's convention, and augmentations that keep them whole.

A sample is ``(image, target)``: ``image`` a float tv_tensors.Image in [0, 1] (not normalised:
the instance models normalise internally, as torchvision's detection models do), ``target`` a
dict with ``boxes`` (tv_tensors.BoundingBoxes, XYXY, pixel extents), ``labels`` (int64, 1..K,
0 is background), ``masks`` (uint8 tv_tensors.Mask, N x H x W) and ``image_id`` (int).
Because boxes and masks are tv_tensors, torchvision.transforms.v2 moves them together with
the image: a flip or crop changes all three consistently.

Sources: the built-in synthetic shapes (their instance-id maps), folders of instance-index
masks, and COCO JSON (:mod:`seglab.data.coco`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from seglab.data.base import default_palette
from seglab.data.io import images_in, read_image
from seglab.data.synthetic import SyntheticShapes
from seglab.data.transforms import number_option, range_option

DEFAULT_SCALE = (0.75, 1.25)  # the affine zoom around the native scale (small objects keep their size on average)

__all__ = [
    "InstanceFolder",
    "InstanceFolderError",
    "SyntheticInstances",
    "INSTANCE_AUGMENT_KEYS",
    "collate_instances",
    "instance_augment_options",
    "instance_transforms",
    "make_target",
    "masks_from_instance_map",
    "open_instance_dataset",
]


def make_target(masks: torch.Tensor, labels: torch.Tensor, image_id: int) -> dict[str, Any]:
    """Target dict from N x H x W masks: empty masks dropped, boxes derived from the masks.

    A box spans whole pixels (x2 = last column + 1), so a one-pixel object has a box of
    width 1 rather than a degenerate one, and COCO's [x, y, w, h] is simply [x1, y1, x2-x1, y2-y1].
    """
    height, width = masks.shape[-2:]
    masks = masks.bool()
    keep = masks.flatten(1).any(1) if len(masks) else torch.zeros(0, dtype=torch.bool)
    masks, labels = masks[keep], labels[keep]
    boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]) if len(masks) else torch.zeros((0, 4))
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": labels.long(),
        "masks": tv_tensors.Mask(masks.to(torch.uint8)),
        "image_id": int(image_id),
    }


def masks_from_instance_map(instances: torch.Tensor, semantic: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An instance-index map (0 = background, k = instance k) -> (N x H x W bool masks, labels).

    An instance's label is the most frequent semantic class under it when ``semantic`` is given,
    else 1 (a single "object" class).
    """
    ids = torch.unique(instances)
    ids = ids[ids > 0]
    masks = instances[None] == ids[:, None, None]
    if semantic is None:
        return masks, torch.ones(len(ids), dtype=torch.int64)
    labels = [int(torch.mode(semantic[m]).values) for m in masks]
    return masks, torch.tensor(labels, dtype=torch.int64)


class SyntheticInstances(torch.utils.data.Dataset):
    """The built-in synthetic shapes as instance samples: one target per visible shape.

    Arguments as :class:`seglab.data.synthetic.SyntheticShapes`, plus ``transforms``
    (a torchvision.transforms.v2 callable over ``(image, target)``).
    """

    def __init__(
        self,
        num_samples: int = 512,
        image_size: int | tuple[int, int] = 128,
        num_classes: int = 6,
        split: str = "train",
        seed: int = 0,
        max_objects: int = 4,
        transforms: Any = None,
    ) -> None:
        self.shapes = SyntheticShapes(num_samples, image_size, num_classes, split, seed, max_objects)
        self.classes = self.shapes.classes
        self.palette = self.shapes.palette
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        sample = self.shapes[index]
        masks, labels = masks_from_instance_map(sample["instances"], sample["mask"])
        pair = (tv_tensors.Image(sample["image"]), make_target(masks, labels, index))
        return self.transforms(*pair) if self.transforms is not None else pair


class InstanceFolderError(FileNotFoundError):
    """An instance folder that cannot be opened; ``kind`` is the data doctor's name for the
    problem ("missing partner", "no class names", "empty split")."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class InstanceFolder(torch.utils.data.Dataset):
    """``root/images/*`` with ``root/masks/*`` instance-index PNGs matched by file stem (or stem
    plus one suffix every mask carries, as in the folder format).

    In a mask, 0 is background and value k marks instance k (16-bit PNGs allow many
    instances). All instances share one class unless ``classes`` names more (given, or read
    from ``classes.yaml`` in ``root`` or the folder above it, as the semantic folder format
    writes it: ``classes: [background, cat, dog]``) and a ``root/classes/`` folder holds
    per-pixel class-index PNGs (same stems) to read labels from. ``split`` ("train", "val",
    "test") takes the semantic folder format's fixed hold-out of the files, every
    ``HOLDOUT_EVERY``-th in name order from the first for val and test, the rest for train;
    None keeps every file (a folder that is one split already).
    """

    def __init__(self, root: str | Path, classes: Sequence[str] | None = None, transforms: Any = None,
                 split: str | None = None) -> None:
        from seglab.data.folder import HOLDOUT_EVERY, find_class_table, masks_by_image_stem, read_class_table

        self.root = Path(root)
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise InstanceFolderError("missing partner" if folder == mask_dir else "empty split",
                                          f"instance folder data set needs {folder}")
        images = images_in(image_dir)
        masks = masks_by_image_stem({p.stem for p in images}, {p.stem: p for p in images_in(mask_dir)})
        missing = [p.name for p in images if p.stem not in masks]
        if missing:
            raise InstanceFolderError("missing partner", f"no instance mask in {mask_dir} for image {missing[0]} "
                                      f"({len(missing)} missing)")
        if not images:
            raise InstanceFolderError("empty split", f"no images found in {image_dir}")
        if split is not None:
            held_out = images[::HOLDOUT_EVERY]
            images = [p for index, p in enumerate(images) if index % HOLDOUT_EVERY] if split == "train" else held_out
            if not images:
                raise InstanceFolderError("empty split", f"{image_dir} leaves no image to split {split!r} (every "
                                          f"{HOLDOUT_EVERY}th, from the first, is held out for val; the rest is train): "
                                          "add images, or train/ and val/ folders")
        self.pairs = [(p, masks[p.stem]) for p in images]
        if classes is None:
            table = find_class_table(self.root) or find_class_table(self.root.parent)
            classes = read_class_table(table)[0] if table is not None else ("background", "object")
            if table is None and (self.root / "classes").is_dir():
                raise InstanceFolderError("no class names", f"{self.root / 'classes'} holds class maps but no classes.yaml "
                                          f"names the classes (put one in {self.root} or {self.root.parent}: "
                                          "classes: [background, ...])")
        self.class_dir = self.root / "classes" if len(classes) > 2 else None
        if self.class_dir is not None and not self.class_dir.is_dir():
            raise InstanceFolderError("missing partner", f"{len(classes) - 1} object classes but no {self.class_dir} "
                                      "folder of class maps to tell them apart (one index PNG per mask, same name)")
        self.classes = tuple(classes)
        self.palette = default_palette(len(self.classes))
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_path, mask_path = self.pairs[index]
        pixels = read_image(image_path)
        instances = _read_index_png(mask_path)
        if instances.shape != pixels.shape[-2:]:
            raise ValueError(f"mask {mask_path} is {tuple(instances.shape)} but its image is {tuple(pixels.shape[-2:])}")
        semantic = _read_index_png(self.class_dir / mask_path.name) if self.class_dir is not None else None
        masks, labels = masks_from_instance_map(instances, semantic)
        pair = (tv_tensors.Image(pixels), make_target(masks, labels, index))
        return self.transforms(*pair) if self.transforms is not None else pair


def _read_index_png(path: Path) -> torch.Tensor:
    with Image.open(path) as mask:
        array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"instance mask {path} must have one channel, it has shape {array.shape}")
    return torch.from_numpy(array.astype(np.int64))


def instance_transforms(train: bool, crop_size: int | None = None, scale: tuple[float, float] = DEFAULT_SCALE) -> v2.Compose | None:
    """Joint image/box/mask augmentation for training (``None`` for evaluation: nothing to do).

    Random flips, scale jitter around the native scale (an affine zoom, so small objects such
    as nuclei keep their size on average), an optional random crop to ``crop_size`` (padded where
    the image is smaller) and mild colour jitter. torchvision moves boxes and masks with the image
    (masks with nearest-neighbour sampling); boxes are then re-derived from the moved masks,
    because a transformed box is only the hull of the old box, and objects cropped away are dropped.
    """
    if not train:
        return None
    steps: list[Any] = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomAffine(degrees=0.0, scale=scale)]
    if crop_size is not None:
        steps.append(v2.RandomCrop(crop_size, pad_if_needed=True))
    steps += [v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2), _boxes_from_masks]
    return v2.Compose(steps)


INSTANCE_AUGMENT_KEYS = ("scale", "copy_paste")


def instance_augment_options(augment: Any) -> dict[str, Any] | None:
    """The training config's ``augment`` for instance data: ``None``/``True`` the defaults,
    ``False`` no augmentation (native images, no crop), or a mapping of ``scale: [low, high]``
    (the affine zoom of :func:`instance_transforms`) and ``copy_paste: p`` (the chance that a
    sample receives objects of another, :class:`seglab.data.copy_paste.CopyPaste`; 0 = off, the
    default). Returns both options, or ``None`` for no augmentation."""
    options: dict[str, Any] = {"scale": DEFAULT_SCALE, "copy_paste": 0.0}
    if augment is None or augment is True:
        return options
    if augment is False:
        return None
    if not isinstance(augment, dict):
        raise ValueError(f"augment must be a mapping of options, not {augment!r}")
    unknown = sorted(set(augment) - set(INSTANCE_AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"unknown augment option(s) for instance data: {', '.join(unknown)}; known: {', '.join(INSTANCE_AUGMENT_KEYS)}")
    if "scale" in augment:
        options["scale"] = range_option(augment["scale"], "scale")
    if "copy_paste" in augment:
        options["copy_paste"] = number_option(augment["copy_paste"], "copy_paste", 0, 1)
    return options


def _boxes_from_masks(image: tv_tensors.Image, target: dict[str, Any]) -> tuple[tv_tensors.Image, dict[str, Any]]:
    rebuilt = make_target(target["masks"], target["labels"], target["image_id"])
    return image, {**target, **rebuilt}


def collate_instances(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Instance samples differ in size and object count, so a batch stays two lists."""
    images, targets = zip(*batch)
    return list(images), list(targets)


INSTANCE_FORMATS = ("coco", "instance")  # what `--format` may name for instance data


def open_instance_dataset(source: str = "synthetic", split: str = "train", *, transforms: Any = None,
                          format: str | None = None, **options: Any) -> torch.utils.data.Dataset:
    """An instance data set by name or path.

    - ``"synthetic"``: :class:`SyntheticInstances` (options: num_samples, image_size,
      num_classes, seed, max_objects);
    - a COCO JSON file, or a folder holding exactly one ``*.json`` (e.g. DSB2018's
      ``instances.json``): :class:`~seglab.data.coco.CocoInstances` with the fixed hold-out
      split of :func:`~seglab.data.coco.coco_split_ids` (option: val_every);
    - a folder with ``<split>/images`` and ``<split>/masks``, or with ``images/`` and ``masks/``
      split by the semantic folder format's fixed hold-out: :class:`InstanceFolder` (option:
      classes; else its classes.yaml).

    ``format`` ("coco" or "instance", as `--format` names them), when given, must be the
    layout found: one error line otherwise, rather than reading the set as the other.
    """
    if format is not None and format not in INSTANCE_FORMATS:
        raise ValueError(f"--format {format}: instance data is {' or '.join(INSTANCE_FORMATS)} (a COCO file, or an instance folder)")
    if source == "synthetic":
        if format is not None:
            raise ValueError(f"--format {format} describes a --data folder; the built-in synthetic set has no layout to name")
        return SyntheticInstances(split=split, transforms=transforms, **options)
    from seglab.data.coco import CocoInstances

    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        found: tuple[str, Any] = ("coco", lambda: CocoInstances(path, split=split, transforms=transforms, **options))
    elif not path.is_dir():
        raise FileNotFoundError(f"instance data set {source!r} is neither 'synthetic', a COCO JSON file nor a folder")
    elif (path / split / "images").is_dir():
        found = ("instance", lambda: InstanceFolder(path / split, transforms=transforms, **options))
    elif (path / "images").is_dir() and (path / "masks").is_dir():  # one folder: the fixed hold-out split
        found = ("instance", lambda: InstanceFolder(path, transforms=transforms, split=split, **options))
    elif len(annotation_files := sorted(path.glob("*.json"))) == 1:
        found = ("coco", lambda: CocoInstances(annotation_files[0], split=split, transforms=transforms, **options))
    else:
        raise ValueError(f"cannot tell the layout of {path}: expected one COCO *.json, or images/ and masks/ folders")
    layout, open_it = found
    if format is not None and format != layout:
        what = "a COCO set" if layout == "coco" else "an instance folder (images/ and masks/)"
        raise ValueError(f"--format {format}: {source} is {what}; give --format {layout} or leave --format out")
    return open_it()
