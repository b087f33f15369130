"""Pictures: colour masks, overlays, prediction panels and training curves."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from seglab.files import atomic_write

__all__ = ["colorize", "palette_image", "overlay", "prediction_panel", "plot_curves", "to_uint8_image"]


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float C x H x W tensor in [0, 1] (or an H x W x 3 array) as H x W x 3 uint8."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float()
        if image.dim() == 3 and image.shape[0] in (1, 3, 4):
            image = image[:3].permute(1, 2, 0)
        image = image.numpy()
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def _lookup(palette: Sequence[Sequence[int]], ignore_colour: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    table[:] = ignore_colour
    table[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
    return table


def colorize(mask: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Class-index mask (H x W) to an RGB picture; indices beyond the palette are black."""
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return _lookup(palette)[mask.astype(np.int64).clip(0, 255)]


def palette_image(mask: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A mode "P" PNG-ready image: pixel values are class indices, the palette gives colours."""
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    picture = Image.fromarray(mask.astype(np.uint8), mode="P")
    picture.putpalette(_lookup(palette).reshape(-1).tolist())
    return picture


def overlay(image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured mask onto the image; background (class 0) stays untouched."""
    picture = to_uint8_image(image).astype(np.float32)
    colours = colorize(mask, palette).astype(np.float32)
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    blend = np.where((mask > 0)[..., None], (1 - alpha) * picture + alpha * colours, picture)
    return blend.round().astype(np.uint8)


def prediction_panel(image: torch.Tensor, target: torch.Tensor, prediction: torch.Tensor, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Image | ground truth overlay | prediction overlay, side by side with a 2-pixel gap."""
    parts = [to_uint8_image(image), overlay(image, target, palette), overlay(image, prediction, palette)]
    gap = np.full((parts[0].shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([parts[0], gap, parts[1], gap, parts[2]], axis=1)


def plot_curves(rows: Sequence[dict], path: str | Path) -> None:
    """Training loss and validation metrics per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in rows], marker="o", label="train loss")
    if all("val_loss" in row for row in rows):
        left.plot(epochs, [row["val_loss"] for row in rows], marker="o", label="val loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    for key, label in (("miou", "val mIoU"), ("pixel_accuracy", "val pixel accuracy"), ("mdice", "val mean Dice")):
        if all(key in row for row in rows):
            right.plot(epochs, [row[key] for row in rows], marker="o", label=label)
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
