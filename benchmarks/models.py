"""Model zoo benchmark: parameters, GFLOPs and CPU throughput, side by side with peers.

For each architecture at a stated input size this prints parameters, GFLOPs (2 FLOPs per
multiply-add, torch.utils.flop_counter), inference images/s (eval mode, no_grad) and training
images/s (forward + backward + SGD step, train mode) for seglab's model and, where they have the
same architecture on the same encoder, segmentation_models_pytorch's and torchvision's. All
models are randomly initialised; nothing is downloaded.

    python benchmarks/models.py --image-size 256 --batch-size 2 --iterations 3 --threads 2

Differences that remain inside a row are listed in `NOTES` and printed under the table.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn as nn

import seglab
from seglab.models.profile import count_flops, count_parameters

NUM_CLASSES = 21


def _seglab(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: seglab.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def _smp(cls_name: str, **kwargs) -> Callable[[], nn.Module] | None:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        return None
    return lambda: getattr(smp, cls_name)(encoder_weights=None, classes=NUM_CLASSES, **kwargs)


def _torchvision(fn_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models.segmentation as tvs

        return getattr(tvs, fn_name)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False)

    return build


# (row label, {library: builder}); the same architecture and encoder within a row.
ROWS: list[tuple[str, dict[str, Callable[[], nn.Module] | None]]] = [
    ("FCN-8s / VGG16", {"seglab": _seglab("fcn8s")}),
    ("SegNet / VGG16-BN", {"seglab": _seglab("segnet")}),
    ("U-Net (original, BN)", {"seglab": _seglab("unet")}),
    ("U-Net / ResNet34", {"seglab": _seglab("unet", encoder="resnet34"),
                          "smp": _smp("Unet", encoder_name="resnet34")}),
    ("FPN / ResNet34", {"seglab": _seglab("fpn", encoder="resnet34"), "smp": _smp("FPN", encoder_name="resnet34")}),
    ("PSPNet / ResNet50 (OS 8)", {"seglab": _seglab("pspnet", encoder="resnet50", aux=False),
                                  "smp": _smp("PSPNet", encoder_name="resnet50", encoder_depth=5, upsampling=32)}),
    ("DeepLabV3 / ResNet50 (OS 8)", {"seglab": _seglab("deeplabv3", encoder="resnet50", output_stride=8),
                                     "torchvision": _torchvision("deeplabv3_resnet50")}),
    ("DeepLabV3+ / ResNet50 (OS 16)", {"seglab": _seglab("deeplabv3plus", encoder="resnet50"),
                                       "smp": _smp("DeepLabV3Plus", encoder_name="resnet50")}),
    ("HRNetV2 / W18-small", {"seglab": _seglab("hrnet", encoder="hrnet_w18_small")}),
    ("SegFormer-B0", {"seglab": _seglab("segformer", variant="b0"), "smp": _smp("Segformer", encoder_name="mit_b0")}),
    ("Stacked Hourglass (2 stacks)", {"seglab": _seglab("hourglass")}),
]

NOTES = [
    "PSPNet: smp's PSPNet has no dilated backbone (encoder at stride 32 here) and a 1-conv head; "
    "seglab's runs the paper's dilated ResNet at output stride 8, hence the FLOPs gap.",
    "DeepLabV3: torchvision's head and seglab's are the same design (ASPP + 3x3 conv + classifier), "
    "with exactly the same parameter count.",
    "U-Net/ResNet34, FPN/ResNet34, DeepLabV3+/ResNet50 and SegFormer-B0 have exactly smp's parameter count.",
]


def _throughput(model: nn.Module, images: torch.Tensor, iterations: int, train: bool) -> float:
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4) if train else None
    model.train(train)

    def step() -> None:
        if train:
            output = model(images)
            logits = output["out"] if isinstance(output, dict) else output
            optimiser.zero_grad()
            logits.float().mean().backward()
            optimiser.step()
        else:
            with torch.no_grad():
                model(images)

    step()  # warm-up: allocator, oneDNN kernel selection
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return iterations * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="row labels (substrings) to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    print(f"input {args.batch_size}x3x{args.image_size}x{args.image_size}, {NUM_CLASSES} classes, "
          f"{args.threads} threads, torch {torch.__version__}")
    header = f"| {'architecture':32s} | {'library':11s} | {'params (M)':>10s} | {'GFLOPs':>7s} | {'infer img/s':>11s} | {'train img/s':>11s} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, builders in ROWS:
        if args.only and not any(o.lower() in label.lower() for o in args.only):
            continue
        for library, build in builders.items():
            if build is None:
                continue
            model = build()
            params = count_parameters(model) / 1e6
            gflops = count_flops(model, args.image_size) / 1e9
            infer = _throughput(model, images, args.iterations, train=False)
            trained = _throughput(model, images, args.iterations, train=True)
            print(f"| {label:32s} | {library:11s} | {params:10.2f} | {gflops:7.1f} | {infer:11.2f} | {trained:11.2f} |",
                  flush=True)
            del model
    print()
    for note in NOTES:
        print(f"- {note}")


if __name__ == "__main__":
    main()
