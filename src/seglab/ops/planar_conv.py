"""A 3x3 convolution to few output channels (a segmentation head's classes) with its vectors
along the pixels, for CPU inference (`seglab.ops.native.planar_conv3x3`).

oneDNN's direct kernels put 16 output channels in a vector: 21 classes fill 21 of 32 lanes,
and U-Net's 16 -> 21 head on 512 x 512 ran at 173-190 GFLOP/s where 16 -> 16 ran at 268 (AVX-512
Xeon, 2 threads). With the pixels of a row in the lanes every lane works: 1.28-1.34x oneDNN on
16 -> 21 over 512 x 512 and 128 -> 21 over 128 x 128, batch 1 and 8 (`benchmarks/planar_conv.py`).
The scores come out planar (N x C x H x W contiguous), as the pixels run along the vectors.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.ops import native
from seglab.ops.grad_mode import records_gradients
from seglab.ops.tracing import being_traced

__all__ = ["arranged_weights", "planar_conv3x3", "planar_conv_fits", "planar_conv_takes"]

LANES = 16  # of an AVX-512 vector: outputs in whole vectors waste none, so they stay with oneDNN


def planar_conv_takes(conv: nn.Conv2d) -> bool:
    """Whether `planar_conv3x3` computes this convolution: 3x3, stride 1, zero padding 1, no
    dilation or groups, input channels in whole vectors (transposed 16 x 16 at a time), output
    channels that are not (whose vectors oneDNN's kernel would leave part empty)."""
    return (tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1)
            and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels % LANES == 0 and conv.out_channels % LANES != 0)


def planar_conv_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this call runs natively: a batched float32 channels-last CPU map, no gradient
    recorded, no tracer (which cannot record the native call), the native kernels built."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last) and not records_gradients(x, weight)
            and not being_traced() and native.available())


def arranged_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's 3 x 3 x C_in x P taps and P biases (P: the outputs rounded up to whole
    register blocks, the extra ones zero) from a C_out x C_in x 3 x 3 weight and its bias."""
    out_channels = weight.shape[0]
    padded = -(-out_channels // native.PLANAR_OUTS) * native.PLANAR_OUTS
    taps = weight.new_zeros(3, 3, weight.shape[1], padded)
    taps[..., :out_channels] = weight.detach().permute(2, 3, 1, 0)
    biases = weight.new_zeros(padded)
    if bias is not None:
        biases[:out_channels] = bias.detach()
    return taps, biases


def planar_conv3x3(x: torch.Tensor, taps: torch.Tensor, biases: torch.Tensor, out_channels: int, *,
                   relu: bool = False) -> torch.Tensor:
    """The convolution of the channels-last `x` with `arranged_weights`' taps and biases (then
    the ReLU with `relu`): N x out_channels x H x W, contiguous (planar)."""
    return native.planar_conv3x3(x.permute(0, 2, 3, 1), taps, biases, out_channels, relu=relu)
