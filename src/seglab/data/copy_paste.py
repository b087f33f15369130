"""Copy-paste augmentation for instance segmentation (Ghiasi et al., CVPR 2021, "Simple Copy-Paste
is a Strong Data Augmentation Method for Instance Segmentation").

A random subset of the objects of a second training sample is pasted, pixels and masks, on top
of the first; the first sample's masks lose what the pasted objects now cover, objects hidden
entirely are dropped, and boxes are re-derived from the masks. Both samples went through the
training transforms on their own (the paper's independent scale jitter), so a pasted object
lands at a new position, scale and flip. Each image then carries more objects, and with them
more positive anchors or RoIs per unit of compute, in new contexts and overlaps.
"""
from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors

from seglab.data.instance import make_target

__all__ = ["CopyPaste", "paste_objects"]


def paste_objects(
    image: torch.Tensor, target: dict[str, Any], source_image: torch.Tensor, source_target: dict[str, Any], chosen: torch.Tensor
) -> tuple[tv_tensors.Image, dict[str, Any]]:
    """``image``/``target`` with the source objects ``chosen`` (a boolean vector) pasted on top.

    The source is aligned at the top-left corner; where it is smaller or larger than the
    destination, the pasted masks are padded or cut to the destination's size (objects cut
    away entirely disappear).
    """
    height, width = image.shape[-2:]
    masks = target["masks"].as_subclass(torch.Tensor).bool()
    pasted = _fit(source_target["masks"].as_subclass(torch.Tensor).bool()[chosen], height, width)
    pasted_pixels = _fit(source_image.as_subclass(torch.Tensor), height, width)
    cover = pasted.any(0) if len(pasted) else torch.zeros((height, width), dtype=torch.bool)
    new_image = torch.where(cover, pasted_pixels.to(image.dtype), image.as_subclass(torch.Tensor))
    all_masks = torch.cat([masks & ~cover, pasted])
    labels = torch.cat([target["labels"], source_target["labels"][chosen]])
    return tv_tensors.Image(new_image), {**target, **make_target(all_masks, labels, target["image_id"])}


def _fit(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Cut or zero-pad the last two dimensions to (height, width), keeping the top-left corner."""
    t = t[..., :height, :width]
    pad_h, pad_w = height - t.shape[-2], width - t.shape[-1]
    if pad_h or pad_w:
        t = torch.nn.functional.pad(t, (0, pad_w, 0, pad_h))
    return t


class CopyPaste(torch.utils.data.Dataset):
    """Wraps an instance data set (already augmented per sample) with copy-paste.

    Args:
        dataset: yields ``(image, target)`` as :mod:`seglab.data.instance` describes.
        probability: chance that a sample receives pasted objects (1.0 in the paper).
    Random draws (the source sample, how many of its objects and which) use torch's global
    generator, like torchvision's transforms, so DataLoader workers and seeds behave the same.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, probability: float = 1.0) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"copy-paste probability must be between 0 and 1, not {probability!r}")
        self.dataset = dataset
        self.probability = probability

    def __getattr__(self, name: str) -> Any:  # classes, palette, num_classes of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image, target = self.dataset[index]
        if len(self.dataset) < 2 or float(torch.rand(())) >= self.probability:
            return image, target
        other = int(torch.randint(len(self.dataset) - 1, ()))
        source_image, source_target = self.dataset[other + (other >= index)]  # any sample but this one
        count = len(source_target["labels"])
        if count == 0:
            return image, target
        # a uniformly random number of objects (1..count), then which ones
        keep = int(torch.randint(1, count + 1, ()))
        chosen = torch.zeros(count, dtype=torch.bool)
        chosen[torch.randperm(count)[:keep]] = True
        return paste_objects(image, target, source_image, source_target, chosen)
