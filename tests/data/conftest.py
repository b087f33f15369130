"""Tiny on-disk fixtures in each data set layout, written on the fly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglab.data.base import default_palette


def write_rgb(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), "RGB").save(path)
    return path


def write_index(path: Path, labels: np.ndarray, palette: bool = False) -> Path:
    """An index mask: mode L, or mode P with the VOC palette when ``palette``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = labels.shape
    image = Image.frombytes("P" if palette else "L", (width, height), labels.astype(np.uint8).tobytes())
    if palette:
        image.putpalette([c for colour in default_palette(256) for c in colour])
    image.save(path)
    return path


def random_pair(rng: np.random.Generator, height: int = 12, width: int = 16, values: tuple[int, ...] = (0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 256, size=(height, width, 3))
    labels = rng.choice(np.array(values), size=(height, width))
    return image, labels


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def helpers():
    """The writer functions, for test modules (tests have no package to import them from)."""

    class Helpers:
        rgb = staticmethod(write_rgb)
        index = staticmethod(write_index)
        pair = staticmethod(random_pair)

    return Helpers
