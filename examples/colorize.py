"""Image-to-image with the U-Net decoder: learn to colourise the synthetic shapes.

The model sees the grayscale image (1 channel) and predicts, with a regression head
(`task="image2image"`, 3 output channels) trained with an L1 loss, how far each RGB channel is
from the gray value; the colour image is gray + that offset. Starting from the gray baseline
(the gray value in all three channels), it can only learn colour on top of it. Shapes have
random colours, so a perfect answer is impossible; the model learns the backgrounds' tints and
plausible colours, and the script reports its validation L1 next to the gray baseline's.

    python examples/colorize.py --steps 200 --out colorize.png
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import seglab  # noqa: E402
from seglab.data.synthetic import SyntheticShapes  # noqa: E402


def to_gray(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="colorize.png")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_set = SyntheticShapes(args.samples, image_size=args.image_size, seed=args.seed)
    val_set = SyntheticShapes(16, image_size=args.image_size, seed=args.seed, split="val")
    train_images = torch.stack([s["image"] for s in train_set])
    val_images = torch.stack([s["image"] for s in val_set])

    model = seglab.create_model("unet", num_classes=3, in_channels=1, encoder=args.encoder, task="image2image")
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, args.steps + 1):
        batch = train_images[torch.randint(0, len(train_images), (16,))]
        gray = to_gray(batch)
        loss = F.l1_loss(gray + model(gray), batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  train L1 {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        gray = to_gray(val_images)
        predicted = (gray + model(gray)).clamp(0, 1)
    model_l1 = F.l1_loss(predicted, val_images).item()
    gray_l1 = F.l1_loss(gray.expand_as(val_images), val_images).item()
    print(f"validation L1: model {model_l1:.4f}, gray baseline {gray_l1:.4f}")

    figure, axes = plt.subplots(3, 4, figsize=(8, 6))
    for column in range(4):
        for row, (title, picture) in enumerate(
            [("gray input", gray[column].expand(3, -1, -1)), ("prediction", predicted[column]), ("target", val_images[column])]
        ):
            axes[row, column].imshow(picture.permute(1, 2, 0))
            axes[row, column].set_title(title, fontsize=8)
            axes[row, column].axis("off")
    figure.suptitle(f"U-Net/{args.encoder} colourisation, val L1 {model_l1:.3f} (gray {gray_l1:.3f})")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
