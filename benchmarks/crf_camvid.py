"""Dense CRF on real data: CamVid val, a seglab-trained model, with and without the CRF.

    seglab train --config configs/camvid_unet.yaml --max-minutes 10 --name camvid-unet-crf
    python benchmarks/crf_camvid.py --checkpoint runs/camvid-unet-crf
    python benchmarks/crf_camvid.py --checkpoint runs/camvid-unet-crf --crf-params theta_alpha=40,w1=5
    python benchmarks/crf_camvid.py --checkpoint runs/camvid-unet-crf --split train --limit 40 \
        --sweep "w1=10;w1=5;theta_alpha=40,w1=5;theta_alpha=40,w1=3"   # choose parameters off val

The model's softmax probabilities on each image (at the size the checkpoint's data options
give, as `seglab eval` uses) are scored as they are and after `seglab.crf.refine` with the
same image, by mIoU (seglab.metrics.ConfusionMatrix) and by Boundary IoU
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
    parser.add_argument("--sweep", help="several --crf-params settings separated by ';', each scored")
    parser.add_argument("--split", default="val", help="val (default) or train, e.g. to choose CRF parameters")
    parser.add_argument("--limit", type=int, help="only the first N images of the split")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"CamVid not found at {args.data}")

    model, config = load_checkpoint(args.checkpoint)
    data = dict(config.get("data", {}))
    data.pop("source", None)
    data.pop("augment", None)
    dataset = open_dataset(args.data, args.split, **{**data, "format": "camvid", "augment": False})
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(min(args.limit, len(dataset))))
    classes, ignore_index = config["classes"], config.get("ignore_index", 255)
    normalize = Normalize(config["mean"], config["std"])
    settings = args.sweep.split(";") if args.sweep else [args.crf_params]
    crfs = {text or "defaults": {**DEFAULT_CRF_PARAMS, **parse_crf_params(text)} for text in settings}

    metrics = {
        name: (ConfusionMatrix(len(classes), ignore_index=ignore_index), BoundaryIoU(len(classes), ignore_index=ignore_index))
        for name in ["network", *(f"+ CRF ({name})" for name in crfs)]
    }
    crf_seconds, images = 0.0, 0
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=4):
            probabilities = logits_of(model(normalize(batch["image"]))).float().softmax(dim=1)
            scored = {"network": probabilities}
            for name, params in crfs.items():
                start = time.perf_counter()
                scored[f"+ CRF ({name})"] = refine(batch["image"], probabilities, params)
                crf_seconds += time.perf_counter() - start
            images += batch["image"].shape[0]
            for name, scores in scored.items():
                for metric in metrics[name]:
                    metric.update(scores.argmax(dim=1), batch["mask"])

    size = tuple(batch["image"].shape[-2:])
    print(f"CamVid {args.split}: {images} images at {size[1]}x{size[0]}, model {config['model']} from {args.checkpoint}")
    print(f"CRF defaults: {DEFAULT_CRF_PARAMS}; CRF time {crf_seconds / images / len(crfs):.3f} s per image ({torch.get_num_threads()} threads)")
    print("| | mIoU | Boundary IoU | pixel accuracy |")
    print("|---|---|---|---|")
    figures = {}
    for name, (confusion, boundary) in metrics.items():
        c, b = confusion.compute(), boundary.compute()
        figures[name] = {"miou": float(c["miou"]), "boundary_iou": float(b["mboundary_iou"]), "pixel_accuracy": float(c["pixel_accuracy"])}
        print(f"| {name} | {figures[name]['miou']:.4f} | {figures[name]['boundary_iou']:.4f} | {figures[name]['pixel_accuracy']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"crf": crfs, "images": images, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
