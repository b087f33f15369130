"""int8 inference (`seglab.engine.int8`, `optimize_for_inference(precision="int8")`) against
the float32 fast path, in interleaved rounds: the figures behind `--precision int8`. Not a test:
it prints Markdown tables.

    python benchmarks/int8.py                         # convolutions, then the models at batch 1
    python benchmarks/int8.py --rounds 9 --threads 2

Convolutions: the float32 fast path's `FusedConv` (packed weights, ReLU fused, Winograd where it
pays) against its `Int8Convolution` (the input quantized in one native pass, oneDNN's int8
kernel, float32 out), batch 1, channels last; the ResNet-50 shapes of DeepLabV3-R50 at output
stride 8 and ResNet-34 3x3 ones. Models: the bench's architectures at 512 x 512 (random
initialisation, calibrated on two random images), with the largest difference of the logits
and the share of pixels whose class agrees with the float32 path.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seglab.bench import ARCHITECTURES
from seglab.engine.fastpath import optimize_for_inference, use_winograd
from seglab.engine.int8 import Int8Convolution, cpu_runs_int8
from seglab.engine.onednn import FusedConv
from seglab.models.registry import create_model
from winograd import interleaved, interleaved_arguments

# in, out, kernel, side, dilation
CONVOLUTIONS = ((1024, 256, 1, 64, 1), (256, 1024, 1, 64, 1), (2048, 512, 1, 64, 1), (512, 2048, 1, 64, 1),
                (256, 256, 3, 64, 2), (512, 512, 3, 64, 4), (2048, 256, 3, 64, 12), (64, 64, 3, 128, 1),
                (128, 128, 3, 64, 1), (256, 256, 3, 32, 1))
MODELS = ("unet-r34", "fpn-r34", "pspnet-r34-os8", "deeplabv3plus-r34", "segformer-b0", "fcn-r50", "deeplabv3-r50")


def convolution_row(in_channels: int, out_channels: int, kernel: int, side: int, dilation: int, rounds: int) -> str:
    torch.manual_seed(0)
    plain = nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation).eval()
    float32 = FusedConv(plain.requires_grad_(False), nn.ReLU(), prepack=True)
    model = nn.Sequential(float32)
    use_winograd(model)
    x = torch.randn(1, in_channels, side, side).relu().contiguous(memory_format=torch.channels_last)
    int8 = FusedConv(plain, nn.ReLU(), prepack=True)
    int8.int8 = Int8Convolution(int8, 0.0, float(x.max()))
    with torch.inference_mode():
        reference, result = model(x), int8(x)
        seconds, ratios = interleaved([lambda: model(x), lambda: int8(x)], rounds)
    error = float((result - reference).abs().max() / reference.abs().max())
    gop = 2 * in_channels * out_channels * kernel * kernel * side * side / 1e9
    return (f"| {in_channels} -> {out_channels}, {kernel}x{kernel}, dilation {dilation}, {side} x {side} | "
            f"{seconds[0] * 1e3:.2f} ({gop / seconds[0]:.0f}) | {seconds[1] * 1e3:.2f} ({gop / seconds[1]:.0f}) | "
            f"{ratios[1]:.2f}x | {error:.1e} |")


def _logits(output: object) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


def model_row(key: str, batch: int, rounds: int) -> str:
    arch = ARCHITECTURES[key]
    torch.manual_seed(0)
    model = create_model(arch.seglab_model, num_classes=21, **arch.seglab_kwargs).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(1, 3, 512, 512, generator=generator) for _ in range(2)]
    x = torch.randn(batch, 3, 512, 512, generator=generator)
    float32 = optimize_for_inference(model, "32")
    int8 = optimize_for_inference(model, "int8", calibration=calibration)
    with torch.inference_mode():
        reference, result = _logits(float32(x)), _logits(int8(x))
        seconds, ratios = interleaved([lambda: float32(x), lambda: int8(x)], rounds)
    error = float((result - reference).abs().max() / reference.abs().max())
    agreement = float((result.argmax(1) == reference.argmax(1)).float().mean())
    return (f"| {arch.title} | {batch} | {seconds[0] * 1e3:.1f} | {seconds[1] * 1e3:.1f} | {ratios[1]:.2f}x | "
            f"{error:.1e} | {agreement:.4f} |")


def main() -> None:
    args = interleaved_arguments(__doc__.split("\n\n")[0], rounds=7, timed="inference")
    if not cpu_runs_int8():
        raise SystemExit("this CPU has no VNNI or AMX 8-bit products: int8 is refused here")
    print("| convolution (batch 1) | float32 fast path, ms (GFLOP/s) | int8, ms (GOP/s) | float32 / int8 | "
          "error (of the largest output) |")
    print("|---|---|---|---|---|")
    for shape in CONVOLUTIONS:
        print(convolution_row(*shape, args.rounds), flush=True)
    print("\n| model (512 x 512) | batch | float32 fast path, ms | int8, ms | float32 / int8 | logits' error | "
          "same class |")
    print("|---|---|---|---|---|---|---|")
    for key in MODELS:
        print(model_row(key, 1, args.rounds), flush=True)


if __name__ == "__main__":
    main()
