"""Reading images from disk, with one clear error per bad file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "read_image", "list_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    """An image file as float32 C x H x W in [0, 1] (RGB for 3 channels, L for 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as picture:
            picture = picture.convert("L" if channels == 1 else "RGBA" if channels == 4 else "RGB")
            array = np.asarray(picture, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{path} is not a readable image ({error.__class__.__name__})") from None
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def list_images(paths: list[str | Path]) -> list[Path]:
    """Files as given, and the image files inside any folder given (sorted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"image {path} does not exist")
    return found
