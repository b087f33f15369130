"""Checkerboard artifacts: transposed convolution (stride 2, kernel 3) versus resize-then-conv.

Odena, Dumoulin & Olah, Distill 2016, "Deconvolution and Checkerboard Artifacts": when the
kernel size is not a multiple of the stride, a transposed convolution's kernel overlaps itself
unevenly, so every other output pixel receives more contributions — a checkerboard pattern.
Nearest resize followed by a 3x3 convolution has no uneven overlap and so no pattern.

The same small decoder (16x16 features -> 64x64 image, two x2 upsamplings) is trained with
each upsampler to reconstruct synthetic images from their 4x-downsampled version. The saved
figure shows a validation image, both reconstructions, and both decoders' answer to a flat grey
input (contrast stretched), where the checkerboard is plain. The script also prints the
"checkerboard energy": the mean absolute difference between the output on a flat input and its
2x2 box-smoothed version (0 for a pattern-free decoder).

    python examples/checkerboard.py --steps 300 --out checkerboard.png
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from seglab.data.synthetic import SyntheticShapes  # noqa: E402
from seglab.ops.upsample import make_upsample  # noqa: E402


class SmallDecoder(nn.Module):
    def __init__(self, upsample: str, width: int = 32) -> None:
        super().__init__()
        options = {"kernel_size": 3} if upsample == "transposed" else {}
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.up1 = make_upsample(upsample, width, width, 2, **options)
        self.up2 = make_upsample(upsample, width, width, 2, **options)
        if upsample == "transposed":
            # Random, not bilinear, initial weights: what a decoder learns from scratch.
            for up in (self.up1, self.up2):
                nn.init.kaiming_uniform_(up.conv.weight, a=5**0.5)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.up1(x))
        x = F.relu(self.up2(x))
        return self.out(x)


def checkerboard_energy(decoder: nn.Module, size: int = 16) -> float:
    with torch.no_grad():
        flat = decoder(torch.full((1, 3, size, size), 0.5))[..., 8:-8, 8:-8]
        smooth = F.avg_pool2d(F.pad(flat, (0, 1, 0, 1), mode="replicate"), 2, stride=1)
    return (flat - smooth).abs().mean().item()


def train(upsample: str, images: torch.Tensor, steps: int, seed: int) -> SmallDecoder:
    torch.manual_seed(seed)
    decoder = SmallDecoder(upsample)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    small = F.interpolate(images, scale_factor=0.25, mode="area")
    for _ in range(steps):
        batch = torch.randint(0, len(images), (16,))
        loss = F.l1_loss(decoder(small[batch]), images[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    print(f"{upsample:12s} final L1 {loss.item():.4f}  checkerboard energy {checkerboard_energy(decoder):.5f}")
    return decoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="checkerboard.png")
    args = parser.parse_args()

    data = SyntheticShapes(args.samples + 1, image_size=64, seed=args.seed)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    train_images, probe = images[:-1], images[-1:]
    decoders = {kind: train(kind, train_images, args.steps, args.seed) for kind in ("transposed", "resize_conv")}

    figure, axes = plt.subplots(2, 3, figsize=(9, 6))
    axes[0, 0].imshow(probe[0].permute(1, 2, 0).clamp(0, 1))
    axes[0, 0].set_title("target")
    axes[1, 0].imshow(F.interpolate(probe, scale_factor=0.25, mode="area")[0].permute(1, 2, 0).clamp(0, 1))
    axes[1, 0].set_title("input (16x16)")
    for column, (kind, decoder) in enumerate(decoders.items(), start=1):
        with torch.no_grad():
            output = decoder(F.interpolate(probe, scale_factor=0.25, mode="area"))[0]
            flat = decoder(torch.full((1, 3, 16, 16), 0.5))[0, 0, 8:-8, 8:-8]
        label = "transposed conv k3 s2" if kind == "transposed" else "resize + conv 3x3"
        axes[0, column].imshow(output.permute(1, 2, 0).clamp(0, 1))
        axes[0, column].set_title(label)
        # Contrast stretched around the mean; a pattern-free output stays uniformly mid-grey.
        deviation = flat - flat.mean()
        stretched = 0.5 + deviation / (2 * deviation.abs().max().clamp_min(1e-6))
        axes[1, column].imshow(stretched, cmap="gray", vmin=0, vmax=1)
        axes[1, column].set_title(f"flat input, energy {checkerboard_energy(decoder):.4f}")
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
