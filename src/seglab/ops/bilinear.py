"""Bilinear upsampling by a whole factor, for class scores on the CPU.

`F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)` computes each output
pixel's source position, weights and four neighbours one pixel at a time; on the CPU that ran
at 1.3-2.4 ns per output value for a channels-last map of 21 class scores (128 x 128 -> 512 x
512, float32: 8-10 ms on 2 cores of a Xeon), far from the time needed just to write the output
(1.7 ms). Bilinear interpolation is separable, and with a whole factor s the weights repeat
with period s, so the same result comes from two passes that suit the channels-last layout:

- along the width, at the input's height: output column s*i + p blends input columns i + d_p
  and i + d_p + 1 with weights (1 - f_p, f_p). Blocks of `block` input columns (plus one
  replicated column either side) times one small (s*block) x (block+2) matrix give the
  columns of a block in order: one batched matrix product over all rows and blocks.
- along the height: output row s*i + p blends two whole rows of the first pass (W*s*C
  contiguous values each), one `lerp` per phase p straight into the output.

Edges: PyTorch clamps source positions to the map, which is what replicating the first and
last row / column gives. Same result as F.interpolate up to float rounding (tested); about
half its time for few channels. With many channels (64 and more) F.interpolate's inner loop
over channels is efficient already and this is slower, so only `upsample_scores` uses it.

`add_bilinear_upsampled_` adds several maps, each upsampled to one size, into a map of that
size, and can apply a ReLU to the sum: SegFormer's decoder sums its stages' shares so. In CPU
inference on channels-last maps it runs as one pass of a native kernel (`seglab.ops.native`'s
`bilinear.c`) that reads each output value once and writes it once, where PyTorch's operators
wrote an upsampled copy of each share and read the sum back once per share and once for the
ReLU: SegFormer-B0's three shares (256 channels, 64 x 64, 32 x 32 and 16 x 16 -> 128 x 128), 2
threads of an AVX-512 Xeon, interleaved medians: batch 8 63 -> 16 ms, batch 1 5.3 -> 1.9 ms.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients
from seglab.ops.tracing import being_traced

__all__ = ["add_bilinear_upsampled_", "bilinear_upsample_by", "whole_scale"]


@lru_cache(maxsize=None)
def _phases(scale: int) -> tuple[tuple[int, float], ...]:
    """Per output phase p: (offset of the first source pixel from i in the map padded by one,
    weight of the second). Output s*i + p sits at source position i + (p + 0.5) / s - 0.5."""
    phases = []
    for phase in range(scale):
        position = (phase + 0.5) / scale - 0.5
        first = math.floor(position)
        phases.append((first + 1, position - first))
    return tuple(phases)


@lru_cache(maxsize=32)
def _block_matrix(scale: int, block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(scale*block) x (block+2): the output columns of one block of input columns, read from
    the block with one extra column either side."""
    matrix = torch.zeros(scale * block, block + 2, dtype=torch.float64)
    for column in range(block):
        for phase, (offset, weight) in enumerate(_phases(scale)):
            matrix[scale * column + phase, column + offset] += 1 - weight
            matrix[scale * column + phase, column + offset + 1] += weight
    return matrix.to(dtype=dtype, device=device)


def whole_scale(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> int | None:
    """The factor s >= 2 with size == (s*H, s*W) for x's H x W, or None."""
    height, width = x.shape[-2:]
    out_height, out_width = size
    if height == 0 or width == 0 or out_height % height or out_height // height < 2:
        return None
    scale = out_height // height
    return scale if out_width == scale * width else None


def bilinear_upsample_by(x: torch.Tensor, scale: int, block: int = 32) -> torch.Tensor:
    """F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) for a
    channels-last N x C x H x W float tensor, as a width pass (one batched matrix product) and
    a height pass (whole-row blends); the result is channels-last. Not differentiable (the
    second pass writes into its output): for inference."""
    if not x.is_contiguous(memory_format=torch.channels_last) or x.dim() != 4:
        raise ValueError("bilinear_upsample_by takes a channels-last N x C x H x W tensor")
    n, channels, height, width = x.shape
    pixels = x.permute(0, 2, 3, 1)  # N x H x W x C, contiguous
    blocks = -(-width // block)
    # Replicated edge columns; the right side also fills the last block.
    padded = torch.cat([pixels[:, :, :1], pixels, pixels[:, :, -1:].expand(n, height, blocks * block - width + 1, channels)], 2)
    windows = padded.unfold(2, block + 2, block).reshape(-1, channels, block + 2).transpose(1, 2)
    wide = torch.matmul(_block_matrix(scale, block, x.dtype, x.device), windows)  # (N H blocks) x (s block) x C
    rows = wide.view(n, height, blocks * block * scale, channels)[:, :, : width * scale].reshape(n, height, -1)
    rows = torch.cat([rows[:, :1], rows, rows[:, -1:]], 1)  # replicated edge rows
    out = torch.empty(n, height, scale, rows.shape[-1], dtype=x.dtype, device=x.device)
    for phase, (offset, weight) in enumerate(_phases(scale)):
        torch.lerp(rows[:, offset : offset + height], rows[:, offset + 1 : offset + 1 + height], weight, out=out[:, :, phase])
    return out.view(n, height * scale, width * scale, channels).permute(0, 3, 1, 2)


def _adds_natively(out: torch.Tensor, parts: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> bool:
    """Whether the native kernel takes the sum: no gradient, a channels-last float32 or bf16 CPU
    map, and parts of its batch, channels and dtype, outside tracers (a TorchScript trace under
    no_grad, as `seglab export --format torchscript` takes it, recorded the map without the
    kernel's sum: SegFormer's decoder lost its stages 2-4)."""
    if records_gradients(out, *parts) or being_traced():
        return False
    fits = all(p.device == out.device and p.dtype == out.dtype and p.dim() == 4 and p.shape[:2] == out.shape[:2]
               and min(p.shape[2:]) > 0 for p in parts)
    return (fits and out.device.type == "cpu" and out.dim() == 4 and 0 < len(parts) <= native.MAX_UPSAMPLED
            and out.dtype in (torch.float32, torch.bfloat16) and out.is_contiguous(memory_format=torch.channels_last)
            and native.available())


def add_bilinear_upsampled_(out: torch.Tensor, parts: list[torch.Tensor] | tuple[torch.Tensor, ...], *,
                            relu: bool = False) -> torch.Tensor:
    """out += sum(F.interpolate(p, out's H x W, mode="bilinear", align_corners=False) for p in
    parts), then relu_ with `relu`: in place, `out` and each part N x C x H x W (the parts of
    any size). One pass of the native kernel for a channels-last `out` (float32 or bf16) where
    no gradient is needed; PyTorch's operators otherwise (differentiable). Returns out."""
    if _adds_natively(out, parts):
        nhwc = [p.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1) for p in parts]
        native.add_upsampled_(out.permute(0, 2, 3, 1), nhwc, relu=relu)
        return out
    for part in parts:
        out.add_(F.interpolate(part, size=out.shape[-2:], mode="bilinear", align_corners=False))
    return out.relu_() if relu else out
