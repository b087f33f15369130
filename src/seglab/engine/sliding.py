"""Sliding-window inference: predict an image of any size with tiles of a fixed size.

The image is covered by overlapping tiles; each tile's class probabilities are weighted by a
window that is 1 in the middle and ramps down across the overlap, then the weighted sums are
divided by the summed weights. Tile borders, where a convolution sees zero padding instead of
context, therefore count little wherever a neighbouring tile covers the same pixels. Only
`tile_batch` tiles go through the model at once, so its memory does not grow with the image;
the output (K x H x W probabilities) does.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["tile_starts", "blend_window", "sliding_window"]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: every `stride`, plus a last tile flush with the end."""
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(height: int, width: int, margin_y: int, margin_x: int) -> torch.Tensor:
    """H x W weights: 1 inside, a linear ramp from 1/(margin+1) to 1 across each margin."""

    def ramp(length: int, margin: int) -> torch.Tensor:
        distance = torch.minimum(torch.arange(length), torch.arange(length).flip(0)).float()
        return ((distance + 1) / (margin + 1)).clamp(max=1.0) if margin > 0 else torch.ones(length)

    return ramp(height, margin_y)[:, None] * ramp(width, margin_x)[None, :]


@torch.inference_mode()
def sliding_window(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    tile: int | tuple[int, int],
    overlap: float = 0.25,
    tile_batch: int = 4,
) -> torch.Tensor:
    """Blended probabilities N x K x H x W of `forward` (tiles B x C x h x w -> probabilities
    B x K x h x w) over `images` N x C x H x W.

    Args:
        tile: tile side, or (height, width); clipped to the image.
        overlap: fraction of a tile shared with its neighbour, in [0, 1).
        tile_batch: tiles per forward pass; bounds the model's memory.
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"--overlap must be in [0, 1), not {overlap}")
    if tile_batch < 1:
        raise ValueError(f"--tile-batch must be a positive number, not {tile_batch}")
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if min(tile_h, tile_w) < 1:
        raise ValueError(f"--tile must be a positive size, not {tile}")
    count, _, height, width = images.shape
    tile_h, tile_w = min(tile_h, height), min(tile_w, width)
    stride_h, stride_w = max(1, round(tile_h * (1 - overlap))), max(1, round(tile_w * (1 - overlap)))
    window = blend_window(tile_h, tile_w, tile_h - stride_h, tile_w - stride_w).to(images.device)
    boxes = [(y, x) for y in tile_starts(height, tile_h, stride_h) for x in tile_starts(width, tile_w, stride_w)]
    weights = torch.zeros(height, width, device=images.device)
    for y, x in boxes:
        weights[y : y + tile_h, x : x + tile_w] += window
    jobs = [(n, y, x) for n in range(count) for y, x in boxes]
    output: torch.Tensor | None = None
    for first in range(0, len(jobs), tile_batch):
        chunk = jobs[first : first + tile_batch]
        tiles = torch.stack([images[n, :, y : y + tile_h, x : x + tile_w] for n, y, x in chunk])
        probabilities = forward(tiles).float()
        if output is None:
            output = torch.zeros(count, probabilities.shape[1], height, width, device=images.device)
        for (n, y, x), tile_probabilities in zip(chunk, probabilities):
            output[n, :, y : y + tile_h, x : x + tile_w].add_(tile_probabilities * window)
    assert output is not None
    return output.div_(weights)
