"""Image-to-image with U-Net: inpaint a square hole in the synthetic images.

The model sees the image with a random square hole (set to 0) plus the hole mask as a 4th
channel and predicts the 3 RGB channels with a regression head (`task="image2image"`); the L1
loss is taken on the hole only and the output keeps the visible pixels. The baseline fills the
hole with the mean colour of the visible pixels; the script prints both validation L1 errors
(inside the hole) and saves a figure.

    python examples/inpaint.py --steps 300 --out inpaint.png
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import seglab  # noqa: E402
from seglab.data.synthetic import SyntheticShapes  # noqa: E402


def random_holes(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A mask (N x 1 x H x W, 1 inside the hole) with one size x size square per image."""
    n, _, height, width = images.shape
    holes = torch.zeros(n, 1, height, width)
    tops = torch.randint(0, height - size + 1, (n,), generator=generator)
    lefts = torch.randint(0, width - size + 1, (n,), generator=generator)
    for i in range(n):
        holes[i, :, tops[i] : tops[i] + size, lefts[i] : lefts[i] + size] = 1
    return holes


def inpaint(model: torch.nn.Module, images: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    visible = images * (1 - holes)
    prediction = model(torch.cat([visible, holes], dim=1))
    return visible + prediction * holes


def mean_fill(images: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    visible = 1 - holes
    mean = (images * visible).sum(dim=(2, 3), keepdim=True) / visible.sum(dim=(2, 3), keepdim=True)
    return images * visible + mean * holes


def hole_l1(output: torch.Tensor, images: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    return ((output - images).abs() * holes).sum() / (3 * holes.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--hole", type=int, default=16, help="side of the square hole in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="inpaint.png")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_images = torch.stack([s["image"] for s in SyntheticShapes(args.samples, args.image_size, seed=args.seed)])
    val_set = SyntheticShapes(32, args.image_size, seed=args.seed, split="val")
    val_images = torch.stack([s["image"] for s in val_set])
    val_holes = random_holes(val_images, args.hole, generator)

    model = seglab.create_model("unet", num_classes=3, in_channels=4, base_channels=16, depth=4, task="image2image")
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(1, args.steps + 1):
        batch = train_images[torch.randint(0, len(train_images), (16,), generator=generator)]
        holes = random_holes(batch, args.hole, generator)
        loss = hole_l1(inpaint(model, batch, holes), batch, holes)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  train hole L1 {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        predicted = inpaint(model, val_images, val_holes).clamp(0, 1)
    baseline = mean_fill(val_images, val_holes)
    model_l1 = hole_l1(predicted, val_images, val_holes).item()
    baseline_l1 = hole_l1(baseline, val_images, val_holes).item()
    print(f"validation hole L1: U-Net {model_l1:.4f}, mean-colour fill {baseline_l1:.4f}")

    figure, axes = plt.subplots(4, 4, figsize=(8, 8))
    for column in range(4):
        rows = [
            ("input", val_images[column] * (1 - val_holes[column])),
            ("mean fill", baseline[column]),
            ("U-Net", predicted[column]),
            ("target", val_images[column]),
        ]
        for row, (title, picture) in enumerate(rows):
            axes[row, column].imshow(picture.permute(1, 2, 0))
            axes[row, column].set_title(title, fontsize=8)
            axes[row, column].axis("off")
    figure.suptitle(f"hole L1: U-Net {model_l1:.3f}, mean fill {baseline_l1:.3f}")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
