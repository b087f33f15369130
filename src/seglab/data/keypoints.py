"""Keypoint (pose) samples for Keypoint R-CNN (He et al. 2017, "Mask R-CNN", section 5).

A sample is ``(image, target)``: ``image`` a float tv_tensors.Image in [0, 1], ``target`` a dict
with ``boxes`` (tv_tensors.BoundingBoxes, XYXY), ``labels`` (int64, 1..K, 0 is background),
``keypoints`` (float32, N x J x 3: x, y, visibility), ``area`` (float32, N) and ``image_id``.
Visibility follows COCO (Lin et al. 2014, "Microsoft COCO"): 0 not labelled (or outside the
image), 1 labelled but hidden, 2 visible; torchvision's Keypoint R-CNN trains on every v > 0.
``area`` is the object scale that COCO's object keypoint similarity (OKS) divides by:
``exp(-d^2 / (2 * area * (2 * sigma)^2))`` per keypoint, with per-keypoint constants ``sigma``
(COCO keypoint evaluation, cocodataset.org/#keypoints-eval). Objects without a keypoint of
v > 0 teach the keypoint head nothing and are left out.

Coordinates are continuous, as boxes are: pixel i spans [i, i + 1) (COCO files are read as
they are, as torchvision reads them). Batches are two lists,
:func:`seglab.data.instance.collate_instances`.

Sources: the built-in stick figures (:class:`SyntheticPoses`) and COCO keypoint files
(:class:`CocoKeypoints`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from seglab.data.base import default_palette
from seglab.data.coco import _CocoFile
from seglab.data.instance import DEFAULT_SCALE
from seglab.data.synthetic import _SPLIT_STREAMS, _contrasting_colour, _textured_background
from seglab.data.transforms import image_size_pair

__all__ = [
    "COCO_PERSON_KEYPOINTS",
    "COCO_PERSON_SIGMAS",
    "DEFAULT_SIGMA",
    "CocoKeypoints",
    "KeypointDataset",
    "SyntheticPoses",
    "flip_pairs_of",
    "keypoint_sigmas",
    "keypoint_target",
    "keypoint_transforms",
    "open_keypoint_dataset",
]

COCO_PERSON_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's published constants, as its keypoint evaluation (pycocotools' COCOeval) uses them
COCO_PERSON_SIGMAS = tuple(s / 10 for s in (
    .26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89,
))
# A layout without published constants gets the person average: every keypoint weighed alike,
# at the tolerance of a typical COCO joint.
DEFAULT_SIGMA = sum(COCO_PERSON_SIGMAS) / len(COCO_PERSON_SIGMAS)


def keypoint_sigmas(names: Sequence[str]) -> tuple[float, ...]:
    """OKS constants for a keypoint layout: COCO's for its person layout, else DEFAULT_SIGMA each."""
    if tuple(names) == COCO_PERSON_KEYPOINTS:
        return COCO_PERSON_SIGMAS
    return (DEFAULT_SIGMA,) * len(names)


def flip_pairs_of(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Index pairs ("left_X", "right_X") that trade places when the image is mirrored."""
    index = {name: i for i, name in enumerate(names)}
    return tuple((i, index["right_" + name[5:]]) for i, name in enumerate(names)
                 if name.startswith("left_") and "right_" + name[5:] in index)


def keypoint_target(boxes: torch.Tensor, labels: torch.Tensor, keypoints: torch.Tensor, area: torch.Tensor,
                    image_id: int, canvas_size: tuple[int, int]) -> dict[str, Any]:
    """The target dict of the sample contract (module docstring), in its dtypes."""
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes.float().reshape(-1, 4), format="XYXY", canvas_size=canvas_size),
        "labels": labels.long(),
        "keypoints": keypoints.float(),
        "area": area.float(),
        "image_id": int(image_id),
    }


class KeypointDataset(torch.utils.data.Dataset):
    """What every keypoint data set carries besides its samples: ``classes`` ("background"
    first), ``keypoint_names`` and ``skeleton`` (0-based index pairs joined by a limb), and
    what follows from them: ``palette``, OKS ``sigmas`` and the ``flip_pairs`` a mirror swaps."""

    classes: tuple[str, ...]
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]
    transforms: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return default_palette(len(self.classes))

    @property
    def sigmas(self) -> tuple[float, ...]:
        return keypoint_sigmas(self.keypoint_names)

    @property
    def flip_pairs(self) -> tuple[tuple[int, int], ...]:
        return flip_pairs_of(self.keypoint_names)

    def _transformed(self, image: tv_tensors.Image, target: dict[str, Any]) -> tuple[tv_tensors.Image, dict[str, Any]]:
        return self.transforms(image, target) if self.transforms is not None else (image, target)


# The stick figure: keypoints first (these names), then the elbows and knees that bend its limbs.
_FIGURE_KEYPOINTS = ("head", "neck", "hip", "left_hand", "right_hand", "left_foot", "right_foot")
_LIMB_PATHS = ((0, 1), (1, 7, 3), (1, 8, 4), (1, 2), (2, 9, 5), (2, 10, 6))
_FIGURE_SKELETON = tuple((path[0], path[-1]) for path in _LIMB_PATHS)
_MAX_TILT = 20.0  # degrees: small enough that a figure's left hand stays on the image's left


class SyntheticPoses(KeypointDataset):
    """Procedural stick figures on a textured, noisy background: keypoint data without files.

    Each image holds 1..``max_figures`` upright figures of random size (about 25-60% of the
    image height), position, colour, tilt (at most 20 degrees) and elbow/knee bends. Keypoints
    are the head centre, neck, hip, hands and feet; "left" is the image's left (a stick figure
    has no front), so a horizontal flip swaps left and right. Keypoints outside the image are
    v = 0; those under a figure drawn later are v = 1.

    ``boxes`` enclose all the pixels a figure draws, hidden ones included, so each labelled
    keypoint lies in its box (the keypoint head only learns keypoints inside their box).
    ``area`` is that box's area, not the pixel count: OKS needs the object's scale, which COCO
    takes from a solid person's segment area, and a stick figure covers a small fraction of
    its extent.

    Args:
        num_samples: number of images in the split.
        image_size: side length, or (height, width); at least 32.
        split: "train", "val" or "test"; each split draws from its own random stream.
        seed: the same seed, split and index always give the same sample.
        max_figures: at most this many figures per image (at least one).
        transforms: a callable over ``(image, target)``, e.g. :func:`keypoint_transforms`.
    """

    classes = ("background", "figure")
    keypoint_names = _FIGURE_KEYPOINTS
    skeleton = _FIGURE_SKELETON

    def __init__(self, num_samples: int = 512, image_size: int | tuple[int, int] = 128, split: str = "train",
                 seed: int = 0, max_figures: int = 3, transforms: Any = None) -> None:
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {', '.join(_SPLIT_STREAMS)}, not {split!r}")
        for name, count in (("num_samples", num_samples), ("max_figures", max_figures)):
            if count < 1:
                raise ValueError(f"{name} must be positive, not {count}")
        self.size = image_size_pair(image_size)
        if min(self.size) < 32:
            raise ValueError(f"image_size must be at least 32 pixels (a figure needs room for its limbs), not {image_size}")
        self.num_samples, self.split, self.seed, self.max_figures = num_samples, split, seed, max_figures
        self.transforms = transforms

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index])
        height, width = self.size
        image = _textured_background(rng, height, width)
        owner = np.zeros((height, width), np.int32)  # which figure (1..n) shows at each pixel
        figures = []
        for number in range(1, int(rng.integers(1, self.max_figures + 1)) + 1):
            points, drawn = _stick_figure(rng, height, width)  # never empty: the hip is always inside
            colour = _contrasting_colour(rng, image[drawn].mean(axis=0))
            image[drawn] = np.clip(colour + rng.normal(0.0, 0.04, size=(int(drawn.sum()), 3)), 0.0, 1.0)
            owner[drawn] = number
            figures.append((points[: len(_FIGURE_KEYPOINTS)], drawn))
        kept = []
        for number, (points, drawn) in enumerate(figures, start=1):
            visibility = _visibility(points, owner, number)
            if (visibility == 2).any():
                kept.append((np.concatenate([points, visibility[:, None]], axis=1), _pixel_box(drawn)))
        keypoints = torch.tensor(np.array([k for k, _ in kept]), dtype=torch.float32).reshape(-1, len(_FIGURE_KEYPOINTS), 3)
        boxes = torch.tensor([b for _, b in kept], dtype=torch.float32).reshape(-1, 4)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        target = keypoint_target(boxes, torch.ones(len(kept)), keypoints, area, index, (height, width))
        return self._transformed(tv_tensors.Image(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)), target)


def _stick_figure(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One figure: its points (keypoints, then elbows and knees; continuous pixel coordinates)
    and the H x W mask of the pixels it draws."""
    size = rng.uniform(0.25, 0.6) * height
    hip = np.array([rng.uniform(0.05, 0.95) * width, rng.uniform(0.3, 0.8) * height])
    # In units of the figure's size, hip at the origin, y down; sides: -1 image-left, +1 right.
    points = np.zeros((11, 2))
    points[0], points[1] = (0.0, -0.46), (0.0, -0.34)
    for side, hand, elbow in ((-1, 3, 7), (1, 4, 8)):
        points[elbow], points[hand] = _bent_limb(rng, points[1], side, 0.17, spread=(25, 155), bend=(-45, 45))
    for side, foot, knee in ((-1, 5, 9), (1, 6, 10)):
        points[knee], points[foot] = _bent_limb(rng, points[2], side, 0.24, spread=(5, 35), bend=(-25, 25))
    tilt = math.radians(rng.uniform(-_MAX_TILT, _MAX_TILT))
    rotation = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
    points = hip + size * points @ rotation.T

    thickness = max(2.0, size / 10)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    at = points - 0.5  # PIL centres pixel i at i, these coordinates at i + 0.5

    def disc(centre: np.ndarray, radius: float) -> None:
        draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=1)

    for path in _LIMB_PATHS:
        draw.line([tuple(at[i]) for i in path], fill=1, width=round(thickness))
    for point in at:  # round joints and ends: the pixel under every keypoint is the figure's own
        disc(point, thickness / 2)
    disc(at[0], max(0.1 * size, thickness))  # the head
    return points, np.asarray(canvas, dtype=bool)


def _bent_limb(rng: np.random.Generator, root: np.ndarray, side: int, length: float,
               spread: tuple[float, float], bend: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The joint and end of a two-segment limb that opens outward on ``side`` by ``spread``
    degrees from straight down, then turns by ``bend`` degrees at the joint. The ranges keep
    the end on its own side of the body."""
    first = math.radians(rng.uniform(*spread))
    second = first + math.radians(rng.uniform(*bend))
    joint = root + length * np.array([side * math.sin(first), math.cos(first)])
    return joint, joint + length * np.array([side * math.sin(second), math.cos(second)])


def _pixel_box(drawn: np.ndarray) -> list[int]:
    """The box around a mask's pixels in whole pixels (x2 = last column + 1), as make_target's."""
    columns, rows = np.flatnonzero(drawn.any(0)), np.flatnonzero(drawn.any(1))
    return [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]


def _visibility(points: np.ndarray, owner: np.ndarray, number: int) -> np.ndarray:
    """COCO visibility of figure ``number``'s keypoints: 0 outside the image, 1 where a figure
    drawn later covers the keypoint's pixel, else 2."""
    height, width = owner.shape
    columns, rows = np.floor(points[:, 0]).astype(int), np.floor(points[:, 1]).astype(int)
    inside = (columns >= 0) & (columns < width) & (rows >= 0) & (rows < height)
    covered = owner[rows.clip(0, height - 1), columns.clip(0, width - 1)] > number
    return np.where(inside, np.where(covered, 1, 2), 0).astype(np.float32)


class CocoKeypoints(KeypointDataset):
    """A COCO keypoint file (e.g. ``person_keypoints_val2017.json``) as keypoint samples.

    Categories that list ``keypoints`` names are the classes (labels 1..K in category id
    order); they must share one keypoint layout. Crowd annotations, those without a labelled
    keypoint and those with an empty box (torchvision's detectors refuse them in training) are
    left out. ``boxes`` come from ``bbox`` (XYWH), ``area`` from ``area`` (the segment area
    COCO's OKS uses; the box area where a file lacks it), ``image_id`` is the COCO id.
    ``skeleton`` is the category's, made 0-based.

    Args:
        annotation_file: the COCO keypoint JSON.
        image_dir: folder holding the images; by default ``images/`` next to the JSON, else
            ``../val2017`` for ``annotations/person_keypoints_val2017.json``.
        split, val_every: as :class:`seglab.data.coco.CocoInstances`.
        transforms: a callable over ``(image, target)``, e.g. :func:`keypoint_transforms`.
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path | None = None, split: str | None = None,
                 val_every: int = 5, transforms: Any = None) -> None:
        annotation_file = Path(annotation_file)
        self.file = _CocoFile(annotation_file, image_dir, split, val_every)
        categories = [self.file.coco.cats[c] for c in self.file.category_ids if self.file.coco.cats[c].get("keypoints")]
        if not categories:
            raise ValueError(f"{annotation_file} has no keypoint categories "
                             "(a COCO keypoint file lists 'keypoints' names in its categories)")
        first = categories[0]
        for other in categories[1:]:
            if other["keypoints"] != first["keypoints"]:
                raise ValueError(f"{annotation_file}: categories {first['name']!r} and {other['name']!r} list different "
                                 "keypoints; one data set needs one keypoint layout")
        self.label_of_category = {c["id"]: label for label, c in enumerate(categories, start=1)}
        self.classes = ("background",) + tuple(c["name"] for c in categories)
        self.keypoint_names = tuple(first["keypoints"])
        self.skeleton = tuple((int(i) - 1, int(j) - 1) for i, j in first.get("skeleton", ()))
        self.transforms = transforms

    @property
    def category_of_label(self) -> dict[int, int]:
        """Contiguous label -> the file's COCO category id, to write results the file's tools accept."""
        return {label: category for category, label in self.label_of_category.items()}

    def __len__(self) -> int:
        return len(self.file.image_ids)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image_id = self.file.image_ids[index]
        image = self.file.load_image(image_id)
        joints = len(self.keypoint_names)
        objects = [o for o in self.file.objects(image_id) if self._teaches_keypoints(o)]
        keypoints = torch.tensor([o["keypoints"] for o in objects], dtype=torch.float32).reshape(-1, joints, 3)
        boxes = box_convert(torch.tensor([o["bbox"] for o in objects], dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")
        area = torch.tensor([o.get("area", o["bbox"][2] * o["bbox"][3]) for o in objects], dtype=torch.float32)
        labels = torch.tensor([self.label_of_category[o["category_id"]] for o in objects], dtype=torch.int64)
        target = keypoint_target(boxes, labels, keypoints, area, image_id, tuple(image.shape[-2:]))
        return self._transformed(tv_tensors.Image(image), target)

    def _teaches_keypoints(self, annotation: dict) -> bool:
        if annotation.get("iscrowd", 0) or annotation["category_id"] not in self.label_of_category:
            return False
        flat = annotation.get("keypoints", [])
        if len(flat) != 3 * len(self.keypoint_names):
            raise ValueError(f"annotation {annotation.get('id')} in {self.file.annotation_file.name} has {len(flat)} keypoint "
                             f"values; its category's {len(self.keypoint_names)} keypoints need {3 * len(self.keypoint_names)}")
        _, _, box_width, box_height = annotation["bbox"]
        # num_keypoints as COCOeval reads it: an object it ignores is not a target either
        return annotation.get("num_keypoints", 1) > 0 and any(v > 0 for v in flat[2::3]) and box_width > 0 and box_height > 0


def keypoint_transforms(train: bool, flip_pairs: Sequence[tuple[int, int]], crop_size: int | tuple[int, int] | None = None,
                        scale: tuple[float, float] = DEFAULT_SCALE) -> v2.Compose | None:
    """Joint image/box/keypoint augmentation for training (``None`` for evaluation).

    A horizontal flip (half the time) that also swaps the ``flip_pairs`` rows, so "left_hand"
    names the left hand again; an affine zoom by a factor drawn from ``scale`` around the image
    centre; an optional random crop to ``crop_size`` (padded where the image is smaller); mild
    colour jitter. torchvision's tv_tensors.KeyPoints carry x, y through the zoom and crop.
    The flip is written here: besides the swap, torchvision mirrors keypoints as pixel indices
    (x' = W - 1 - x), while these coordinates are continuous like the boxes (x' = W - x).
    ``area`` is multiplied by the square of the zoom factor (a crop does not change an
    object's scale). Afterwards keypoints outside the image get v = 0, boxes are clipped to
    the image, and objects with an empty box or no keypoint of v > 0 are dropped.
    """
    if not train:
        return None
    steps: list[Any] = [_FlipLeftRight(flip_pairs), _split_visibility, _RandomZoom(scale)]
    if crop_size is not None:
        steps.append(v2.RandomCrop(crop_size, pad_if_needed=True))
    steps += [v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2), _settle]
    return v2.Compose(steps)


class _FlipLeftRight:
    def __init__(self, flip_pairs: Sequence[tuple[int, int]], p: float = 0.5) -> None:
        self.flip_pairs, self.p = tuple(flip_pairs), p

    def __call__(self, image: tv_tensors.Image, target: dict[str, Any]) -> tuple[tv_tensors.Image, dict[str, Any]]:
        if torch.rand(()) >= self.p:
            return image, target
        order = list(range(target["keypoints"].shape[1]))
        for i, j in self.flip_pairs:
            order[i], order[j] = j, i
        keypoints = target["keypoints"][:, order]  # a copy: the sample's own tensor stays as it was
        keypoints[..., 0] = image.shape[-1] - keypoints[..., 0]
        return F.horizontal_flip(image), {**target, "boxes": F.horizontal_flip(target["boxes"]), "keypoints": keypoints}


def _split_visibility(image: tv_tensors.Image, target: dict[str, Any]) -> tuple[tv_tensors.Image, dict[str, Any]]:
    """x, y as tv_tensors.KeyPoints for torchvision to move; visibility rides along untouched."""
    keypoints = target["keypoints"]
    points = tv_tensors.KeyPoints(keypoints[..., :2], canvas_size=tuple(image.shape[-2:]))
    return image, {**target, "keypoints": points, "visibility": keypoints[..., 2]}


class _RandomZoom:
    """v2.RandomAffine's zoom, but it keeps the factor it drew: the area scales with its square."""

    def __init__(self, scale: tuple[float, float]) -> None:
        self.scale = scale

    def __call__(self, image: tv_tensors.Image, target: dict[str, Any]) -> tuple[tv_tensors.Image, dict[str, Any]]:
        factor = float(torch.empty(()).uniform_(*self.scale))
        zoom = {"angle": 0.0, "translate": [0, 0], "scale": factor, "shear": [0.0, 0.0]}
        moved = {key: F.affine(target[key], **zoom) for key in ("boxes", "keypoints")}
        zoomed = F.affine(image, **zoom, interpolation=v2.InterpolationMode.BILINEAR)
        return zoomed, {**target, **moved, "area": target["area"] * factor**2}


def _settle(image: tv_tensors.Image, target: dict[str, Any]) -> tuple[tv_tensors.Image, dict[str, Any]]:
    """Back to the sample contract, with what the geometry pushed out of the image hidden or dropped."""
    height, width = image.shape[-2:]
    points = target["keypoints"].as_subclass(torch.Tensor)
    inside = (points[..., 0] >= 0) & (points[..., 0] < width) & (points[..., 1] >= 0) & (points[..., 1] < height)
    visibility = torch.where(inside, target["visibility"], 0.0)
    boxes = target["boxes"].as_subclass(torch.Tensor).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (visibility > 0).any(1)
    keypoints = torch.cat([points, visibility[..., None]], dim=-1)
    rebuilt = keypoint_target(boxes[keep], target["labels"][keep], keypoints[keep], target["area"][keep],
                              target["image_id"], (height, width))
    return image, {**{k: v for k, v in target.items() if k != "visibility"}, **rebuilt}


def open_keypoint_dataset(source: str = "synthetic", split: str = "train", *, transforms: Any = None,
                          **options: Any) -> KeypointDataset:
    """A keypoint data set by name or path.

    - ``"synthetic"``: :class:`SyntheticPoses` (options: num_samples, image_size, seed, max_figures);
    - a COCO keypoint JSON file, or a folder holding exactly one ``*.json``: :class:`CocoKeypoints`
      with the fixed hold-out split of :func:`~seglab.data.coco.coco_split_ids` (options:
      image_dir, val_every).
    """
    if source == "synthetic":
        return SyntheticPoses(split=split, transforms=transforms, **options)
    path = Path(source)
    if path.is_dir():
        candidates = sorted(path.glob("*.json"))
        if len(candidates) != 1:
            raise ValueError(f"cannot tell the keypoint file in {path}: expected one COCO keypoint *.json, "
                             f"found {len(candidates)}")
        path = candidates[0]
    elif not (path.is_file() and path.suffix == ".json"):
        raise FileNotFoundError(f"keypoint data set {source!r} is neither 'synthetic', a COCO JSON file nor a folder")
    return CocoKeypoints(path, split=split, transforms=transforms, **options)
