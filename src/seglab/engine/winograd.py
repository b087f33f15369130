"""When Winograd's F(4x4, 3x3) or F(6x6, 3x3) (`seglab.ops.winograd`) beats oneDNN's direct
float32 convolution on the CPU, and which: the rule of the fast inference path (`FusedConv`)
and of the training route (`seglab.engine.convolutions`).

Winograd does a quarter of the multiply-adds, but pays for its transforms a cost per tile and
channel, and its 36 matrix products are [tiles x C_in] @ [C_in x C_out]: few tiles or few
channels make them small and slow. Measured against oneDNN, channels last, 2 threads, on an
AVX2 EPYC (docs/bench.md), interleaved medians:

- Inference: 64 channels lose at any size (0.7-0.8x on 128 x 128). From 128 channels the
  product tiles x C_in x C_out decides: 128 ch on 64 x 64 (2^22) 1.31x, 256 on 16 x 16 (2^20)
  1.27x, 512 on 8 x 8 (2^20) 1.05x; 128 on 16 x 16 (2^18) 0.80x, 512 on 4 x 4 (2^18) 0.84x.
- Training (forward and both gradients, through autograd): the tiles decide, as the weight
  gradient's products run over them: 16 tiles 0.40-0.68x, 256 tiles 1.20-1.96x (128 to 256
  channels), 1024 tiles 1.69-1.92x. 64 tiles (a ResNet's last stage at a 512 input, batch 4)
  first measured 0.89-1.02x against oneDNN's eager convolution; against the training route's
  own direct convolution (tuned weight gradients) 1.39-1.62x in 15 interleaved rounds (256 and
  512 channels, two runs each), hence a minimum of 64 tiles. oneDNN's float32 backward is slow
  enough that 64 channels win too on large maps (1.26-1.40x on 128 x 128, batch 4, 2^24
  tiles x C_in x C_out): UNet-R34's training step at 512 x 512 took 1.34x less time with
  Winograd from 64 channels, 1.21x from 128. On small ones they lose: `seglab train`'s default U-Net (64
  channels on 16 x 16, batch 16: 256 tiles, 2^20) took 4% longer, hence also a minimum of
  2^22 for tiles x C_in x C_out (128 channels over 256 tiles, 1.20x, just pass it).
- Dilated, as d x d undilated phases stacked on the batch: 256 ch at dilation 2 on 64 x 64
  2.1-2.3x, 512 ch at 4 2.4-2.5x (a ResNet's stages 3 and 4 at output stride 8); dilations from 6
  up are `DilatedConvAsGemm`'s, which computes them by Winograd where `atrous_output_tile` says.
- Large dilations (DeepLab's ASPP), against `DilatedConvAsGemm`'s per-tap windows, which
  multiply only the pixels whose products land inside the map (0.77 of the padded
  convolution's products at dilation 12 on 64 x 64, 0.56 at 24, 0.39 at 36). The phases of a
  64 x 64 map at dilation 12 are 5 or 6 pixels wide, so F(6x6) covers each with one tile: 64
  products per phase where the windows take 9 x 0.77 per pixel, 3.1x fewer. Xeon with AVX-512,
  2 threads, interleaved medians, windows / F(6x6) / F(4x4): 2048 -> 256 at dilation 12 on
  64 x 64 2.09x / 1.26x (batch 8 2.07x / 0.89x), 512 -> 256 2.17x / 1.21x (batch 8 2.11x /
  1.35x), 256 -> 256 2.22x, 128 -> 128 2.00x, 2048 -> 256 at 6 on 32 x 32 1.84x / 1.32x and on
  64 x 64 2.35x / 2.33x, at 18 on 64 x 64 0.81x / 1.77x; at 24 on 64 x 64 0.51x / 0.97x (batch
  8 0.36x / 0.64x), at 36 0.16x / 0.30x, at 12 on 32 x 32 0.49x / 0.98x. The ratio of the
  two's multiply-adds (the windows' over the tiles' (m + 2)^2 products each) predicted every
  one: 3.1 -> 1.84-2.22x, 3.5 -> 2.35x, 2.8 -> 2.33x, 2.1 -> 1.77x, 1.36 -> 1.18-1.37x,
  1.17 -> 0.81x, 1.0 -> 0.89-0.98x. Phases of 2-3 pixels (dilation 24 on 64 x 64, 12 on
  32 x 32) fit F(3x3, 3x3)'s 3 x 3 output tiles (25 products each; 1.44x fewer multiply-adds
  than the windows): 2048 -> 256 at 24 on 64 x 64 1.31x (batch 8 1.33x; training, batch 4,
  1.26x), 512 -> 256 1.39x, at 12 on 32 x 32 1.46x. Hence the tile of `ATROUS_TILES` with the
  largest ratio, where it is at least `MIN_ATROUS_SAVING`.
- Maps that fill their 4 x 4 tiles poorly: a Mask R-CNN mask head's 14 x 14 RoIs (and 7 x 7
  ones) fill 77% of theirs, so Winograd computes 1.31x the outputs, while oneDNN's direct kernel
  runs fastest on such small maps (they stay in cache). At 128 channels Winograd then lost:
  200 RoIs of 14 x 14 0.78x in inference, 128 RoIs 0.97x in training (64 channels 0.63x), where
  28 x 28 maps won 1.11x and 1.42x; from 256 channels it still won (1.18x, 1.52x). Hence below
  `MIN_TILE_COVERAGE` only convolutions of `WIDE_CHANNELS` take it.
- F(6x6, 3x3) instead of F(4x4): 21% fewer products and 21% less data through the transforms
  per output, but 6 x 6 output tiles: 32 x 32 and 16 x 16 maps (a ResNet's stages 4 and 5 at a
  512 input, or any stage at output stride 8, per phase) fill only 79% of them, where F(4x4)'s
  fill theirs. `output_tile` takes F(6x6) where its tiles are filled at least
  `MIN_TILE_COVERAGE`. Direct / F(4x4) / F(6x6), interleaved medians: inference 128 ch on
  64 x 64 1.35x / 1.51x (batch 8 1.24x / 1.44x), 1024 -> 512 on 64 x 64 2.77x / 3.24x, 256 ch
  on 32 x 32 1.58x / 1.42x; training (batch 4) 64 ch on 128 x 128 1.11x / 1.27x, 128 ch on
  64 x 64 1.71x / 1.93x, 256 ch on 32 x 32 1.91x / 1.72x. 64 channels in inference stay
  direct (128 x 128: 1.04x at batch 1, 0.80x at batch 8).
- With the native transforms (`seglab.ops.native`, one pass over memory each) the transforms'
  cost per tile and channel fell enough for 64 channels and small maps to win in inference:
  against oneDNN's direct convolution, batch 1, 64 ch on 128 x 128 1.46x (F(6x6); batch 8
  1.68x), 64 on 32 x 32 1.29-1.48x, 64 on 16 x 16 (2^16 tiles x C_in x C_out) 1.13-1.23x, 128
  on 16 x 16 1.54-1.58x, 256 on 4 x 4 2.9x, 512 on 2 x 2 8.9x (F(4x4); oneDNN's packed kernel
  takes 15 ms there); 32 channels still lose (256 x 256: 0.56x, F(6x6) 0.85x). Hence
  `MIN_NATIVE_INFERENCE_CHANNELS` and `MIN_NATIVE_INFERENCE_PRODUCTS` where they are in use.
  In training (forward and both gradients, batch 4, against the route's direct convolution
  with its tuned weight gradient), few channels win as well: 32 ch on 256 x 256 1.51x, 64 -> 32
  1.77x, 32 -> 16 1.22x, 16 on 512 x 512 1.13x, 16 -> 21 1.02x; and smaller products: batch 16,
  64 ch on 16 x 16 (256 tiles, 2^20) 1.52x, 128 on 8 x 8 (64 tiles, 2^20) 1.33x, 16 on 64 x 64
  1.03x. 16 tiles still lose (batch 4, 512 and 256 ch on 8 x 8: 0.77x, 0.78x). Hence
  `MIN_NATIVE_TRAINING_CHANNELS`, the same minimum of tiles, and the same minimum of products
  (2^22). With 2^20, `seglab train`'s default U-Net (batch 16 of 64 x 64; 32 to 128 channels
  over 2^20 products) trained by Winograd where it trains direct, 1.2x faster (399 s against
  459-485), and reached a best validation mIoU of 0.842, where two runs with the direct
  convolutions reached 0.876 and 0.847: the tuned weight-gradient kernels, chosen by timing,
  differ from run to run and so do the trajectories. One run cannot show Winograd's rounding
  harmless to that recipe, so its convolutions stay direct until more runs do.
- Few channels in float32 training on AVX-512 (an Intel Xeon without BF16, 2 threads, batch 4,
  against the route's direct convolution): oneDNN's direct kernels hold 16 channels in one
  vector there, and 16-channel convolutions lost to Winograd: 16 -> 21 on 512 x 512 0.71x
  (F(4x4)) / 0.44x (F(6x6)), 16 -> 16 0.59x / 0.65x, 32 -> 16 on 256 x 256 0.65x / 0.72x, where
  32 -> 32 won 0.98x / 1.09x and 64 -> 32 on 128 x 128 1.09x / 1.08x. UNet-R34's training step
  (its decoder's last block and head have 16 channels) took 1.059x less time with a minimum of
  32, 9 interleaved rounds. Hence `MIN_AVX512_TRAINING_CHANNELS` on processors with AVX-512
  (float32 training on the AVX-512 BF16 Zen 4, which trains in bf16 by default, was not
  measured).
- A U-Net decoder step's convolution over the 2x nearest upsampling of x and a skip, computed
  on the upsampled grid by Winograd with x's tiles gathered from x itself
  (`seglab.ops.winograd_nearest`), against the stride-2 transposed convolution that already
  does 2.25x fewer multiply-adds than the plain one, plus the skip's share (Xeon with AVX-512,
  interleaved): 512 + 256 -> 256 channels from 16 x 16 1.51x (batch 1) / 1.29x (batch 8) in
  inference, 1.33x in training (batch 4); 256 + 128 -> 128 from 32 x 32 1.23x / 1.03x, 1.19x;
  but 128 + 64 -> 64 from 64 x 64 1.00x, training 0.99-1.08x, and 64 + 64 -> 32 from 128 x 128
  0.85-0.91x. Hence `MIN_UPSAMPLING_CHANNELS` in x and out (`upsampling_output_tile`). FPN-R34's
  stride-4 head (256 + 64 -> 128 onto 128 x 128) takes it too: the model 1.054x in inference,
  1.044x in training.
- bf16 inference (AVX-512 BF16 Zen 4, 2 threads, against oneDNN's bf16 direct convolution,
  medians): only F(2x2, 3x3) keeps bf16's precision (`seglab.ops.winograd`), with float32
  transforms around bf16 products, by the native transforms (PyTorch's operators took as long
  as the direct convolution). 512 ch on 8 x 8 1.35x, on 16 x 16 1.25x (batch 8 1.56x), on 32 x 32
  1.43x, at dilation 4 on 64 x 64 1.61x; 768 -> 256 on 32 x 32 1.31x; 512 -> 256 at dilation 2
  on 32 x 32 1.08x; 256 ch 1.02-1.15x (64 x 64, 128 x 128, batch 8 on 32 x 32); 384 -> 128 on
  64 x 64 0.93x, 128 ch on 64 x 64 0.85x. Those transforms read float32 copies of the map and
  the products and wrote float32 tiles for another copy to bf16; with kernels that read and
  write bf16 themselves (the same values, bit for bit) and run F(2x2) on 16-channel vectors
  (`seglab.ops.native`), interleaved medians: 256 ch 1.41-1.56x (32 x 32, 64 x 64, batch 8 on
  32 x 32, dilation 2 on 64 x 64), on 16 x 16 1.24x, on 8 x 8 1.11x; 512 ch at dilation 2 on
  32 x 32 1.52x, at 4 on 64 x 64 1.66x, on 8 x 8 1.12x; 768 -> 256 1.59x, 512 -> 256 at dilation
  2 1.45x, 1024 -> 512 on 64 x 64 1.88x. 128 channels win on large maps too (64 x 64 1.16x,
  batch 8 1.27x, 128 x 128 1.17x, 32 x 32 1.08x; 16 x 16 0.95x, 8 x 8 0.73x), but taking them
  from 1024 tiles changed whole models by 0.98-1.06x (UNet-R34, FPN-R34, DeepLabV3+-R34,
  DeepLabV3-R50, PSPNet-R34: within noise), so they stayed direct; 64 ch 0.82x. With the
  transforms' loops over whole vectors of channels compiled with a constant width
  (`winograd_tiles.c`; bf16 gathers 1.5-2.1x faster), 128 channels won more: inference (bias
  and ReLU in the output transform) 64 x 64 1.33x, batch 8 1.24x, 32 x 32 1.39x, 128 x 128
  1.31x, 128 -> 256 and 256 -> 128 on 64 x 64 1.55x and 1.40x, 16 x 16 1.08-1.20x, but 8 x 8
  0.86x and 4 x 4 0.83x; training (forward and both gradients, batch 4) 64 x 64 1.31x, 32 x 32
  1.27x, 128 x 128 1.38x. 64 channels stay direct (128 x 128 0.99x, batch 8 1.04x, 64 x 64
  1.09x, 16 x 16 0.79x; training 1.07x). Whole models, bf16, 512 x 512, interleaved, inference
  at batch 1 / 8: UNet-R34 1.071-1.077x / 1.067x, FPN-R34 1.011x / 1.023x, DeepLabV3+-R34
  0.998x / 1.040x, PSPNet-R34 (OS 8) 1.015x at batch 1, DeepLabV3-R50 1.006x; training (batch
  4): UNet-R34 1.031x, FPN-R34 1.068x, DeepLabV3+-R34 1.027x, FCN-R50 1.011-1.014x,
  DeepLabV3-R50 0.997x. Hence `MIN_BF16_CHANNELS` in and out, and below `WIDE_CHANNELS` at least
  `MIN_BF16_TILES` in inference. Not on processors with AMX, where oneDNN's bf16 direct kernel
  runs at several times the AVX-512 rate (docs/bench.md) and F(2x2) was not measured: there
  the direct convolution stays.
- float32 F(2x2, 3x3) where F(4x4)'s products wait on their filters: each of F(4x4)'s 36
  products reads a C_in x C_out filter matrix and does 2 multiply-adds per tile with each
  entry, so with few tiles the products run at the rate memory delivers the filters, not at
  the processor's (512 ch, 16 tiles: 37.7 MB of filters for 1.2 GFLOP, 115 GFLOP/s against
  270 with 64 tiles; Xeon with AVX-512, 2 threads). F(2x2)'s 16 products read 2.25x fewer
  filter bytes and do 4x the work per byte. Direct / F(2x2) / F(4x4), interleaved medians,
  batch 1: 512 ch on 16 x 16 2.00x / 1.64x (alone 1.29-1.35x F(2x2) over F(4x4)), on 8 x 8
  1.38x / 0.93x, on 4 x 4 1.39x / 0.88x; 256 ch on 16 x 16 (filters 4x smaller) 1.64x / 2.06x,
  512 ch on 32 x 32 (64 tiles) 0.62x F(2x2) over F(4x4), batch 8 on 16 x 16 0.60x. Hence F(2x2)
  in float32 inference for `MIN_FILTER_BOUND_CHANNELS` in and out over at most
  `MAX_FILTER_BOUND_TILES` 4 x 4 tiles (`call_output_tile`): a ResNet's last stage at batch 1
  of 512 x 512 (UNet-R34's and FPN-R34's encoders).
- Few channels in float32 inference by F(4x4) in one native pass (`seglab.ops.winograd.fuses`,
  `winograd_fused.c`: transforms and products per group of tiles, nothing of the tiles' size
  through memory), against oneDNN's direct convolution (Xeon with AVX-512, 2 threads,
  interleaved): 32 -> 32 on 256 x 256 1.63x (the separate passes 0.95x), 64 -> 32 1.53x,
  64 -> 64 on 128 x 128 2.10-2.19x (F(4x4)'s passes 1.38-1.54x, F(6x6)'s 1.18-1.38x; batch 8
  1.92-2.03x against 1.16-1.20x), 128 -> 64 2.17x (1.54x), 16 -> 32 and 32 -> 16 1.22-1.23x,
  64 -> 64 on 16 x 16 and 32 x 32 2.7-3.0x; 16 -> 16 on 512 x 512 1.00-1.03x; 128 -> 128 on
  64 x 64 1.62-1.78x against the passes' 2.19-2.20x, 96 -> 96 a tie. Hence `fused_pays`: from
  `MIN_FUSED_CHANNELS` in and out with `MIN_FUSED_WIDEST` on one side, C_in x C_out up to
  `seglab.ops.winograd.MAX_FUSED_CHANNEL_PRODUCT`, any map, on processors with AVX-512 (the
  kind measured; elsewhere the rule above). UNet-R34 inference 1.099x at batch 1 and 1.138x at
  batch 8, FPN-R34 1.117x at batch 8 (interleaved).
- bf16 training (autocast; forward and both gradients by one autograd function that keeps to
  the bf16 kernels, `seglab.ops.winograd`), against autocast's oneDNN bf16 direct convolution,
  same Zen 4, interleaved medians: batch 4, 256 ch on 32 x 32 1.44x, on 64 x 64 1.54x, 512 ch
  on 32 x 32 1.55x, 1024 -> 512 on 64 x 64 1.89x, batch 16 256 ch on 64 x 64 1.55x. Few tiles
  lose it: 512 ch on 16 x 16 at batch 16 (1024 tiles) 1.47x, batch 8 1.32x, batch 4 (256 tiles)
  1.03x; 256 ch on 32 x 32 at batch 2 (512 tiles) 1.11x, batch 1 0.89x; on 16 x 16 at batch 8
  1.08x, 16 1.23x. Hence `MIN_BF16_TRAINING_TILES`. With the faster transforms (above) 256
  tiles won too: 512 ch on 16 x 16 at batch 4 1.30x (batch 2, 128 tiles, 1.08x; 8 x 8 at batch
  4, 64 tiles, 0.84x), 256 ch 1.22x, 256 ch on 32 x 32 at batch 1 1.17x; 128 ch 1.06x (4 x 16 x
  16). Hence `MIN_BF16_WIDE_TRAINING_TILES` for 256 channels and more: training steps (bf16,
  batch 4, interleaved) UNet-R34 1.027x, FPN-R34 1.022x, FCN-R50 1.013-1.016x. 128 ch won less
  with the earlier transforms (8 x 64 x 64 1.11x, 4 x 128 x 128 1.24x, 4 x 64 x 64 1.06x) and
  stayed direct; with the faster ones they win 1.27-1.38x and take F(2x2) from
  `MIN_BF16_TRAINING_TILES`, as `MIN_BF16_CHANNELS` says (above).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from seglab.engine.precision import cpu_has
from seglab.ops import native
from seglab.ops.atrous_gemm import share_inside
from seglab.ops.winograd import BF16_TILE, TILE, fuses

LARGE_TILE = 6  # F(6x6, 3x3)

__all__ = [
    "ATROUS_TILES",
    "MIN_ATROUS_SAVING",
    "MAX_DILATION",
    "MAX_FILTER_BOUND_TILES",
    "MIN_AVX512_TRAINING_CHANNELS",
    "MIN_BF16_CHANNELS",
    "MIN_BF16_TILES",
    "MIN_BF16_TRAINING_TILES",
    "MIN_BF16_WIDE_TRAINING_TILES",
    "MIN_FILTER_BOUND_CHANNELS",
    "MIN_FUSED_CHANNELS",
    "MIN_FUSED_WIDEST",
    "MIN_INFERENCE_CHANNELS",
    "MIN_INFERENCE_PRODUCTS",
    "MIN_NATIVE_INFERENCE_CHANNELS",
    "MIN_NATIVE_INFERENCE_PRODUCTS",
    "MIN_NATIVE_TRAINING_CHANNELS",
    "MIN_NATIVE_TRAINING_PRODUCTS",
    "MIN_TILE_COVERAGE",
    "MIN_TRAINING_CHANNELS",
    "MIN_TRAINING_PRODUCTS",
    "MIN_TRAINING_TILES",
    "MIN_UPSAMPLING_CHANNELS",
    "WIDE_CHANNELS",
    "atrous_bf16_pays",
    "atrous_call_tile",
    "atrous_output_tile",
    "atrous_saving",
    "bf16_pays",
    "call_output_tile",
    "conv_takes_winograd",
    "filter_bound",
    "fused_pays",
    "min_channels",
    "output_tile",
    "pays_for_input",
    "tiles",
    "upsampling_output_tile",
    "winograd_dilation",
]

MAX_DILATION = 4
MIN_BF16_CHANNELS = 128  # in and out: bf16 by F(2x2, 3x3), ...
MIN_BF16_TILES = 64  # ... over at least this many 2 x 2 output tiles in inference below WIDE_CHANNELS
MIN_BF16_TRAINING_TILES = 512  # F(2x2)'s 2 x 2 output tiles, in training, ...
MIN_BF16_WIDE_TRAINING_TILES = 256  # ... and from WIDE_CHANNELS in and out
MIN_INFERENCE_CHANNELS = 128  # in and out, with the transforms of PyTorch's operators
MIN_INFERENCE_PRODUCTS = 1 << 20  # tiles x C_in x C_out
MIN_NATIVE_INFERENCE_CHANNELS = 64  # with the native transforms
MIN_NATIVE_INFERENCE_PRODUCTS = 1 << 16
MIN_TRAINING_CHANNELS = 64
MIN_TRAINING_TILES = 64
MIN_TRAINING_PRODUCTS = 1 << 22  # tiles x C_in x C_out
MIN_NATIVE_TRAINING_CHANNELS = 16
MIN_AVX512_TRAINING_CHANNELS = 32  # the same, where oneDNN's direct kernels have AVX-512
MIN_NATIVE_TRAINING_PRODUCTS = 1 << 22  # as with the operators: see the note on accuracy above
MIN_TILE_COVERAGE = 0.9  # the share of the tiles' outputs inside the map below which ...
WIDE_CHANNELS = 256  # ... only this many channels in and out pay
MIN_UPSAMPLING_CHANNELS = 128  # x's and the output's, for `upsampling_output_tile`
MIN_FUSED_CHANNELS = 16  # in and out, with ...
MIN_FUSED_WIDEST = 32  # ... at least this many on one side: F(4x4) in one pass (`fused_pays`)
MIN_FILTER_BOUND_CHANNELS = 512  # in and out: float32 inference by F(2x2) ...
MAX_FILTER_BOUND_TILES = 16  # ... over at most this many of F(4x4)'s tiles
MIN_ATROUS_SAVING = 1.3  # the per-tap windows' multiply-adds over Winograd's: `atrous_output_tile`
ATROUS_TILES = (LARGE_TILE, TILE, 3)  # F(6x6), F(4x4), F(3x3): the phases' widths pick one


def _pair(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def winograd_dilation(weight_shape: Sequence[int], stride: Any, padding: Any, dilation: Any, groups: int) -> int | None:
    """The dilation at which Winograd computes a convolution of these settings (as F.conv2d
    takes them), or None where it does not apply: a 3x3 kernel, stride 1, "same" zero padding
    at a dilation up to `MAX_DILATION`, no groups."""
    d = _pair(dilation)[0]
    same = padding == "same" or _pair(padding) == (d, d)
    if (list(weight_shape[2:]) != [3, 3] or _pair(stride) != (1, 1) or _pair(dilation) != (d, d)
            or not 1 <= d <= MAX_DILATION or not same or groups != 1):
        return None
    return d


def _has_avx512() -> bool:
    return cpu_has("avx512")


def _has_amx() -> bool:
    return cpu_has("amx_tile")


def min_channels(training: bool) -> int:
    """The fewest channels in and out for which Winograd can pay, in training or inference
    (it depends on whether the native transforms are in use, on AVX-512 and, in inference, on
    the one-pass F(4x4): `fused_pays`)."""
    if not training and _fuses_natively():
        return MIN_FUSED_CHANNELS
    return _min_separate_channels(training)


def _min_separate_channels(training: bool) -> int:
    """`min_channels` for Winograd by separate passes (transforms, batched products)."""
    if native.available():
        if training:
            return MIN_AVX512_TRAINING_CHANNELS if _has_avx512() else MIN_NATIVE_TRAINING_CHANNELS
        return MIN_NATIVE_INFERENCE_CHANNELS
    return MIN_TRAINING_CHANNELS if training else MIN_INFERENCE_CHANNELS


def _fuses_natively() -> bool:
    """Whether float32 inference may take the one-pass F(4x4): the native kernels, on a
    processor with AVX-512 (the kind measured)."""
    return native.available() and _has_avx512()


def fused_pays(input_shape: Sequence[int], weight_shape: Sequence[int], dilation: int) -> bool:
    """Whether float32 inference computes this convolution (whose settings `winograd_dilation`
    takes) fastest by F(4x4) in one native pass (`seglab.ops.winograd.fuses`): few channels,
    from `MIN_FUSED_CHANNELS` in and out and `MIN_FUSED_WIDEST` on one side, on any map."""
    out_channels, in_channels = weight_shape[0], weight_shape[1]
    return (_fuses_natively() and fuses(in_channels, out_channels, dilation)
            and min(in_channels, out_channels) >= MIN_FUSED_CHANNELS
            and max(in_channels, out_channels) >= MIN_FUSED_WIDEST)


def conv_takes_winograd(conv: nn.Conv2d, min_channels: int) -> bool:
    """A zero-padded convolution whose settings `winograd_dilation` takes, with at least
    `min_channels` channels in and out."""
    return (conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) >= min_channels
            and winograd_dilation(conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups) is not None)


def tiles(input_shape: Sequence[int], dilation: int, tile: int = TILE) -> int:
    """The tile x tile output tiles of a convolution of an N x C x H x W input at `dilation`."""
    n, _, height, width = input_shape
    rows, cols = -(-height // dilation), -(-width // dilation)  # each phase's size
    return n * dilation * dilation * -(-rows // tile) * -(-cols // tile)


def _coverage(input_shape: Sequence[int], dilation: int, tile: int) -> float:
    """The share of the tiles' outputs that fall inside the map."""
    n, _, height, width = input_shape
    return n * height * width / (tile * tile * tiles(input_shape, dilation, tile))


def pays_for_input(input_shape: Sequence[int], weight_shape: Sequence[int], dilation: int, training: bool) -> bool:
    """Whether Winograd beats the direct convolution for this input and weight (whose settings
    `winograd_dilation` takes)."""
    if not training and fused_pays(input_shape, weight_shape, dilation):
        return True
    channels, count = min(weight_shape[0], weight_shape[1]), tiles(input_shape, dilation)
    products = count * weight_shape[0] * weight_shape[1]
    if _coverage(input_shape, dilation, TILE) < MIN_TILE_COVERAGE and channels < WIDE_CHANNELS:
        return False
    if native.available():
        min_products = MIN_NATIVE_TRAINING_PRODUCTS if training else MIN_NATIVE_INFERENCE_PRODUCTS
    else:
        min_products = MIN_TRAINING_PRODUCTS if training else MIN_INFERENCE_PRODUCTS
    if training and count < MIN_TRAINING_TILES:
        return False
    return channels >= _min_separate_channels(training) and products >= min_products


def output_tile(input_shape: Sequence[int], weight_shape: Sequence[int], dilation: int, training: bool) -> int | None:
    """The output tile of the Winograd algorithm that computes this convolution (whose settings
    `winograd_dilation` takes) fastest, or None where the direct one beats both."""
    if not training and fused_pays(input_shape, weight_shape, dilation):
        return TILE  # in one pass
    if not pays_for_input(input_shape, weight_shape, dilation, training):
        return None
    return LARGE_TILE if _coverage(input_shape, dilation, LARGE_TILE) >= MIN_TILE_COVERAGE else TILE


def filter_bound(input_shape: Sequence[int], weight_shape: Sequence[int], dilation: int) -> bool:
    """Whether F(4x4)'s products for this convolution would wait on reading their filters, so
    that float32 inference runs faster by F(2x2) (with the native transforms: `call_output_tile`)."""
    return (min(weight_shape[0], weight_shape[1]) >= MIN_FILTER_BOUND_CHANNELS
            and tiles(input_shape, dilation) <= MAX_FILTER_BOUND_TILES)


def bf16_pays(weight_shape: Sequence[int], input_shape: Sequence[int], dilation: int = 1,
              training: bool = False) -> bool:
    """Whether F(2x2, 3x3) with bf16 products beats oneDNN's bf16 direct convolution for this
    weight and input (whose settings `winograd_dilation` takes): enough channels, the native
    transforms in use, a processor without AMX (the one kind measured), and enough tiles: in
    training `MIN_BF16_WIDE_TRAINING_TILES` from `WIDE_CHANNELS`, `MIN_BF16_TRAINING_TILES`
    below; in inference any number from `WIDE_CHANNELS`, `MIN_BF16_TILES` below."""
    channels = min(weight_shape[0], weight_shape[1])
    if channels < MIN_BF16_CHANNELS or not native.available() or _has_amx():
        return False
    count = tiles(input_shape, dilation, BF16_TILE)
    wide = channels >= WIDE_CHANNELS
    if training:
        return count >= (MIN_BF16_WIDE_TRAINING_TILES if wide else MIN_BF16_TRAINING_TILES)
    return wide or count >= MIN_BF16_TILES


def call_output_tile(input: torch.Tensor, weight: torch.Tensor, dilation: int, training: bool) -> int | None:
    """The Winograd output tile this call of a convolution Winograd applies to runs with, or
    None for the direct convolution: Winograd takes batched float32 input on the CPU, large
    enough to pay (F(4x4) or F(6x6); F(2x2) in inference where `filter_bound`); bf16 input
    with bf16 weights in inference, and autocast's bf16 in training, where `bf16_pays`
    (F(2x2)). The one check of the inference route (`FusedConv`) and the training one."""
    if input.device.type != "cpu" or input.dim() != 4 or input.numel() == 0:
        return None  # (an empty batch, e.g. Mask R-CNN's mask head without detections: the direct call)
    if torch.is_autocast_enabled("cpu"):  # the convolution runs in autocast's dtype, whatever the input's
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
        return BF16_TILE if training and bf16 and bf16_pays(weight.shape, input.shape, dilation, training) else None
    if input.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
        return BF16_TILE if not training and bf16_pays(weight.shape, input.shape, dilation) else None
    if input.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    tile = output_tile(input.shape, weight.shape, dilation, training)
    if tile is not None and not training and native.available() and filter_bound(input.shape, weight.shape, dilation):
        return BF16_TILE  # F(2x2) in float32 (products and transforms)
    return tile


def atrous_output_tile(input_shape: Sequence[int], weight_shape: Sequence[int], dilation: int) -> int | None:
    """The Winograd output tile (of `ATROUS_TILES`) that computes a float32 3x3 convolution at a
    dilation above `MAX_DILATION` (stride 1, "same" zero padding, no groups: those
    `DilatedConvAsGemm` takes), in inference or training (the savings measured alike), in fewer
    multiply-adds than the per-tap windows over only the pixels inside the map, by at least
    `MIN_ATROUS_SAVING`; None where neither does, or where the native transforms are not in use
    or there are too few channels for them to pay."""
    if (list(weight_shape[2:]) != [3, 3] or not native.available()
            or min(weight_shape[0], weight_shape[1]) < MIN_NATIVE_INFERENCE_CHANNELS):
        return None
    saving, tile = atrous_saving(input_shape, dilation)
    return tile if saving >= MIN_ATROUS_SAVING else None


def atrous_saving(input_shape: Sequence[int], dilation: int) -> tuple[float, int]:
    """(saving, tile): of `ATROUS_TILES`, the tile whose Winograd products over the map's phases
    are fewest, and how many times fewer they are than the per-tap windows' multiply-adds over
    only the pixels inside the map (a 3x3 kernel; per channel pair)."""
    return max((_saving_over_windows(input_shape, dilation, t), t) for t in ATROUS_TILES)


def _saving_over_windows(input_shape: Sequence[int], dilation: int, tile: int) -> float:
    """How many times fewer F(tile x tile)'s products over the map's phases are than the per-tap
    windows' multiply-adds over only the pixels inside the map (a 3x3 kernel; per channel pair)."""
    n, _, height, width = input_shape
    windows = share_inside(height, width, (3, 3), (dilation, dilation)) * 9 * n * height * width
    return windows / (tiles(input_shape, dilation, tile) * (tile + 2) ** 2)


def atrous_bf16_pays(input_shape: Sequence[int], weight_shape: Sequence[int], dilation: int) -> bool:
    """Whether bf16 inference computes a 3x3 convolution at a dilation above `MAX_DILATION` (as
    `atrous_output_tile` takes them) faster by F(2x2, 3x3) over the map's phases than by
    `DilatedConvAsGemm`'s products: where `bf16_pays` and F(2x2)'s products are fewer than the
    per-tap windows' multiply-adds over only the pixels inside the map by `MIN_ATROUS_SAVING`
    (its all-taps product, taken where most of them lie inside, does all nine taps' everywhere,
    more still)."""
    if list(weight_shape[2:]) != [3, 3] or not bf16_pays(weight_shape, input_shape, dilation):
        return False
    return _saving_over_windows(input_shape, dilation, BF16_TILE) >= MIN_ATROUS_SAVING


def atrous_call_tile(x: torch.Tensor, weight_shape: Sequence[int], dilation: Sequence[int]) -> int | None:
    """The Winograd tile this call of a large-dilation convolution runs with, or None for its
    windows: CPU input outside autocast, a square dilation, and float32 input where
    `atrous_output_tile` says, bf16 input (F(2x2)) where `atrous_bf16_pays` (the one check of
    `DilatedConvAsGemm` and of the training route's `AtrousConv2d`)."""
    if x.device.type != "cpu" or x.dim() != 4 or torch.is_autocast_enabled("cpu") or dilation[0] != dilation[1]:
        return None
    if x.dtype == torch.bfloat16:
        return BF16_TILE if atrous_bf16_pays(x.shape, weight_shape, dilation[0]) else None
    return atrous_output_tile(x.shape, weight_shape, dilation[0]) if x.dtype == torch.float32 else None


def upsampling_output_tile(x: torch.Tensor, weight: torch.Tensor, training: bool) -> int | None:
    """The Winograd output tile for a U-Net decoder's 3x3 convolution over the 2x nearest
    upsampling of `x` (and a skip: `weight` takes both), computed on the upsampled grid without
    the upsampled map (`seglab.ops.winograd_nearest`), or None for the transposed convolution
    of `seglab.ops.nearest_conv`: float32 CPU input outside autocast, the native transforms in
    use, `MIN_UPSAMPLING_CHANNELS` in x and out (fewer lost to the transposed convolution,
    which already does 2.25x fewer multiply-adds than the plain one), and Winograd paying for
    the upsampled map by the rule above."""
    if (x.device.type != "cpu" or x.dim() != 4 or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu") or not native.available()
            or min(x.shape[1], weight.shape[0]) < MIN_UPSAMPLING_CHANNELS):
        return None
    n, _, height, width = x.shape
    return output_tile((n, weight.shape[1], 2 * height, 2 * width), weight.shape, 1, training)
