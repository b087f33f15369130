"""The built-in data set: procedurally drawn shapes, deterministic from a seed, no files needed.

Each image holds a few overlapping shapes (circle, square, triangle, ellipse, star) of random
size, rotation, position and colour on a textured, noisy background. A shape's class depends on
its geometry only (colours are random), so a model has to learn shape, not colour. Every sample
carries both the semantic mask and an instance-id map (0 = background, 1..n = visible instances
in drawing order, occluded parts belonging to the shape on top).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

from seglab.data.base import SegmentationDataset, default_palette

__all__ = ["SyntheticShapes", "SHAPES"]

SHAPES = ("circle", "square", "triangle", "ellipse", "star")
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


class SyntheticShapes(SegmentationDataset):
    """Procedural shapes data set.

    Args:
        num_samples: number of images in the split.
        image_size: side length, or (height, width).
        num_classes: background plus the first ``num_classes - 1`` shape kinds (2 to 6).
        split: "train", "val" or "test"; each split draws from its own random stream, so the
            splits never share an image.
        seed: the same seed, split and index always give the same sample.
        max_objects: at most this many shapes per image (at least one).
    """

    def __init__(
        self,
        num_samples: int = 512,
        image_size: int | tuple[int, int] = 64,
        num_classes: int = 6,
        split: str = "train",
        seed: int = 0,
        max_objects: int = 4,
    ) -> None:
        if not 2 <= num_classes <= len(SHAPES) + 1:
            raise ValueError(f"num_classes must be between 2 and {len(SHAPES) + 1}, not {num_classes}")
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {', '.join(_SPLIT_STREAMS)}, not {split!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, not {num_samples}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be positive, not {max_objects}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if min(size) < 8:
            raise ValueError(f"image_size must be at least 8 pixels, not {image_size}")
        self.num_samples = num_samples
        self.size = size
        self.split = split
        self.seed = seed
        self.max_objects = max_objects
        self.classes = ("background",) + SHAPES[: num_classes - 1]
        self.palette = default_palette(num_classes)
        self._render = lru_cache(maxsize=None)(self._render_uncached)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        image, mask, instances = self._render(index)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1),
            "mask": torch.from_numpy(mask).long(),
            "instances": torch.from_numpy(instances).long(),
        }

    def _render_uncached(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index])
        height, width = self.size
        image = _textured_background(rng, height, width)
        mask = np.zeros((height, width), np.uint8)
        instances = np.zeros((height, width), np.int32)
        num_objects = int(rng.integers(1, self.max_objects + 1))
        for instance_id in range(1, num_objects + 1):
            label = int(rng.integers(1, len(self.classes)))
            region = _shape_mask(rng, SHAPES[label - 1], height, width)
            colour = _contrasting_colour(rng, image[region].mean(axis=0) if region.any() else image.mean((0, 1)))
            texture = rng.normal(0.0, 0.04, size=(int(region.sum()), 3))
            image[region] = np.clip(colour + texture, 0.0, 1.0)
            mask[region] = label
            instances[region] = instance_id
        instances = _renumber_visible(instances)
        return image.astype(np.float32), mask, instances


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A base colour, a low-frequency wave pattern and per-pixel noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0.15, 0.85, size=3)
    angle = rng.uniform(0, math.pi)
    frequency = rng.uniform(1.0, 4.0) * 2 * math.pi / max(height, width)
    waves = np.sin(frequency * (x * math.cos(angle) + y * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
    image = base + 0.12 * waves[..., None] * rng.uniform(-1, 1, size=3)
    image += rng.normal(0.0, 0.05, size=(height, width, 3))
    return np.clip(image, 0.0, 1.0)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour visibly different from the mean colour under the shape."""
    for _ in range(20):
        colour = rng.uniform(0.0, 1.0, size=3)
        if np.abs(colour - background).sum() > 0.6:
            return colour
    return 1.0 - background


def _shape_mask(rng: np.random.Generator, shape: str, height: int, width: int) -> np.ndarray:
    radius = rng.uniform(0.14, 0.3) * min(height, width)
    cx = rng.uniform(0.1, 0.9) * width
    cy = rng.uniform(0.1, 0.9) * height
    rotation = rng.uniform(0, 2 * math.pi)
    vertices = _outline(shape, radius, rng)
    cos, sin = math.cos(rotation), math.sin(rotation)
    points = [(cx + px * cos - py * sin, cy + px * sin + py * cos) for px, py in vertices]
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def _outline(shape: str, radius: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Vertices of the shape centred on the origin, before rotation."""
    if shape == "circle":
        return _polygon(48, radius)
    if shape == "square":
        return _polygon(4, radius)
    if shape == "triangle":
        return _polygon(3, radius * 1.15)
    if shape == "ellipse":
        aspect = rng.uniform(0.35, 0.55)
        return [(x, y * aspect) for x, y in _polygon(48, radius * 1.2)]
    if shape == "star":
        inner = radius * 0.45
        return [
            ((radius if k % 2 == 0 else inner) * math.cos(k * math.pi / 5), (radius if k % 2 == 0 else inner) * math.sin(k * math.pi / 5))
            for k in range(10)
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _polygon(sides: int, radius: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(2 * math.pi * k / sides), radius * math.sin(2 * math.pi * k / sides)) for k in range(sides)]


def _renumber_visible(instances: np.ndarray) -> np.ndarray:
    """Instance ids 1..n for the instances that are still visible after occlusion."""
    visible = np.unique(instances)
    visible = visible[visible > 0]
    lookup = np.zeros(int(instances.max()) + 1, np.int32)
    lookup[visible] = np.arange(1, len(visible) + 1, dtype=np.int32)
    return lookup[instances]
