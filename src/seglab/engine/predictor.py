"""Inference with a trained checkpoint: probabilities and masks for images, files or folders."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from seglab.data.io import list_images, read_image
from seglab.engine.checkpoint import load_checkpoint
from seglab.engine.evaluator import Normalize, logits_of
from seglab.engine.trainer import resolve_device
from seglab.files import atomic_write
from seglab.viz import overlay, palette_image

__all__ = ["Predictor"]

ImageLike = torch.Tensor | np.ndarray | Image.Image


class Predictor:
    """Wraps a semantic segmentation model with its normalisation, classes and palette."""

    def __init__(self, model: nn.Module, config: dict[str, Any], device: str | torch.device = "auto") -> None:
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device).eval()
        self.config = config
        self.classes: list[str] = list(config.get("classes", []))
        self.palette: list[list[int]] = config.get("palette", [])
        self.in_channels = int(config.get("kwargs", {}).get("in_channels", 3))
        self.normalize = Normalize(config.get("mean", [0.5] * 3), config.get("std", [0.5] * 3)).to(self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> "Predictor":
        model, config = load_checkpoint(path)
        if config.get("task", "semantic") != "semantic":
            raise ValueError(f"checkpoint {path} is a {config.get('task')} model; this predictor is for semantic models")
        return cls(model, config, device)

    def _as_batch(self, image: ImageLike) -> torch.Tensor:
        """PIL image, H x W x C uint8/float array or C x H x W / N x C x H x W tensor in [0, 1]."""
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("L" if self.in_channels == 1 else "RGB"))
        if isinstance(image, np.ndarray):
            array = image[..., None] if image.ndim == 2 else image
            tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
            image = tensor.float() / 255 if array.dtype == np.uint8 else tensor.float()
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"cannot predict on a {type(image).__name__}; give a PIL image, a numpy array or a tensor")
        batch = image[None] if image.dim() == 3 else image
        if batch.dim() != 4 or batch.shape[1] != self.in_channels:
            raise ValueError(f"expected an image with {self.in_channels} channels, got a tensor of shape {tuple(image.shape)}")
        return batch.to(self.device, torch.float32)

    @torch.inference_mode()
    def predict_proba(self, image: ImageLike) -> torch.Tensor:
        """Class probabilities, K x H x W (or N x K x H x W for a batch)."""
        batch = self._as_batch(image)
        probabilities = logits_of(self.model(self.normalize(batch))).float().softmax(dim=1)
        batched = isinstance(image, torch.Tensor) and image.dim() == 4
        return probabilities if batched else probabilities[0]

    def predict(self, image: ImageLike) -> torch.Tensor:
        """Class index per pixel, H x W (or N x H x W), int64 on the CPU."""
        probabilities = self.predict_proba(image)
        return probabilities.argmax(dim=-3).cpu()

    def predict_files(self, paths: Sequence[str | Path], out_dir: str | Path, progress=None) -> list[Path]:
        """For each image: `<stem>_mask.png` (palette PNG of class indices) and `<stem>_overlay.png`."""
        files = list_images(list(paths))
        if not files:
            raise ValueError("no images to predict: the given folders hold no image files")
        out_dir = Path(out_dir)
        written: list[Path] = []
        task = progress.add_task("predict", total=len(files), info="") if progress is not None else None
        for path in files:
            image = read_image(path, channels=self.in_channels)
            mask = self.predict(image)
            mask_path = out_dir / f"{path.stem}_mask.png"
            overlay_path = out_dir / f"{path.stem}_overlay.png"
            atomic_write(mask_path, lambda tmp: palette_image(mask, self.palette).save(tmp, format="PNG"))
            blended = overlay(image, mask, self.palette)
            atomic_write(overlay_path, lambda tmp: Image.fromarray(blended).save(tmp, format="PNG"))
            written += [mask_path, overlay_path]
            if task is not None:
                progress.update(task, advance=1, info=path.name)
        return written
