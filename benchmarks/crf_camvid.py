"""Dense CRF on real data: CamVid val, a seglab-trained model, with and without the CRF.

    seglab train --config configs/camvid_unet.yaml --max-minutes 10 --name camvid-unet-crf
    python benchmarks/crf_camvid.py --checkpoint runs/camvid-unet-crf
    python benchmarks/crf_camvid.py --checkpoint runs/camvid-unet-crf --crf-params theta_alpha=40,w1=5

The model's softmax probabilities on each validation image (at the size the checkpoint's data
options give, as `seglab eval` uses) are scored as they are and after `seglab.crf.refine`
with the same image, by mIoU (seglab.metrics.ConfusionMatrix) and by Boundary IoU
(seglab.metrics.BoundaryIoU, Cheng et al. 2021, dilation ratio 0.02), ignoring Unlabelled.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from seglab.crf import DEFAULT_CRF_PARAMS, parse_crf_params, refine
from seglab.data import open_dataset
from seglab.engine.checkpoint import load_checkpoint
from seglab.engine.evaluator import Normalize, logits_of
from seglab.metrics import ConfusionMatrix
from seglab.metrics.boundary import BoundaryIoU

CAMVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run directory or .safetensors of a CamVid model")
    parser.add_argument("--data", default=str(CAMVID), help="CamVid folder (default: ../shared/data/camvid)")
    parser.add_argument("--crf-params", default="", help=f"overrides of {DEFAULT_CRF_PARAMS}")
    parser.add_argument("--limit", type=int, help="only the first N validation images")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"CamVid not found at {args.data}")

    model, config = load_checkpoint(args.checkpoint)
    data = dict(config.get("data", {}))
    data.pop("source", None)
    dataset = open_dataset(args.data, "val", **{**data, "format": "camvid"})
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    classes, ignore_index = config["classes"], config.get("ignore_index", 255)
    normalize = Normalize(config["mean"], config["std"])
    params = {**DEFAULT_CRF_PARAMS, **parse_crf_params(args.crf_params)}

    metrics = {
        name: (ConfusionMatrix(len(classes), ignore_index=ignore_index), BoundaryIoU(len(classes), ignore_index=ignore_index))
        for name in ("network", "network + CRF")
    }
    crf_seconds, images = 0.0, 0
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=4):
            probabilities = logits_of(model(normalize(batch["image"]))).float().softmax(dim=1)
            start = time.perf_counter()
            refined = refine(batch["image"], probabilities, params)
            crf_seconds += time.perf_counter() - start
            images += batch["image"].shape[0]
            for name, scores in (("network", probabilities), ("network + CRF", refined)):
                for metric in metrics[name]:
                    metric.update(scores.argmax(dim=1), batch["mask"])

    size = tuple(batch["image"].shape[-2:])
    print(f"CamVid val: {images} images at {size[1]}x{size[0]}, model {config['model']} from {args.checkpoint}")
    print(f"CRF parameters: {params}; CRF time {crf_seconds / images:.3f} s per image ({torch.get_num_threads()} threads)")
    print("| | mIoU | Boundary IoU | pixel accuracy |")
    print("|---|---|---|---|")
    figures = {}
    for name, (confusion, boundary) in metrics.items():
        c, b = confusion.compute(), boundary.compute()
        figures[name] = {"miou": float(c["miou"]), "boundary_iou": float(b["mboundary_iou"]), "pixel_accuracy": float(c["pixel_accuracy"])}
        print(f"| {name} | {figures[name]['miou']:.4f} | {figures[name]['boundary_iou']:.4f} | {figures[name]['pixel_accuracy']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "images": images, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
