"""Instance segmentation benchmarks: accuracy within a CPU time budget, and inference speed.

    python benchmarks/instance.py synthetic --model yolact --minutes 15
    python benchmarks/instance.py dsb2018 --model mask_rcnn --minutes 20
    python benchmarks/instance.py speed --size 512 --encoder resnet50
    python benchmarks/instance.py keypoint-speed --size 512

`synthetic` and `dsb2018` train with seglab's instance trainer (its defaults: precision auto,
torch's threads) for a fixed number of epochs with a cosine schedule sized to fit the budget,
and stop early if the wall-clock budget runs out (checked after each epoch); then the best
checkpoint is evaluated on the validation split with COCO mask AP (pycocotools). Run them on an
otherwise idle machine: the budget is wall time. DSB2018's split is fixed: images sorted by COCO
id, every 5th is val (132 val / 532 train). `speed` times eval-mode inference (batch 1, median
CPU time of interleaved repeats, one thread, after warm-up) of YOLACT, our Mask R-CNN and torchvision's
maskrcnn_resnet50_fpn in one process at the same input size, all randomly initialised (no
download; our Mask R-CNN takes torchvision's random weights), in float32 or (`--precision bf16`) all three under bf16 autocast in channels_last; `--fast`
adds seglab's two models as its commands run them (`optimize_instance_model`), with Winograd's
3x3 convolutions and without. `keypoint-speed` does the same for our Keypoint R-CNN against
torchvision's keypointrcnn_resnet50_fpn (same weights), eager and on the fast path.
Results are printed and appended as JSON lines to benchmarks/results/instance.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from seglab.cli import parse_model_option
from seglab.engine.fastpath import optimize_instance_model, to_channels_last
from seglab.engine.precision import resolve_precision

RESULTS = Path(__file__).parent / "results" / "instance.jsonl"
DSB2018 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dsb2018" / "instances.json"


# Narrower heads than the papers' 800-pixel settings: 128-pixel shapes and nuclei need far less
# capacity, and on a CPU the per-RoI mask head is most of Mask R-CNN's cost.
SMALL_HEADS = {
    "mask_rcnn": {"fpn_channels": 128, "mask_head_width": 128, "box_head_width": 512, "detections_per_image": 20},
    # ProtoNet at 128 channels: the same mask AP after 4 synthetic epochs, 1.6x faster (docs/instance.md)
    "yolact": {"fpn_channels": 128, "proto_width": 128, "detections_per_image": 20},
}
# On the synthetic shapes (a few objects per image) Mask R-CNN's mask head ran on 140-230
# positive RoIs per batch of 8 once the RPN found the objects, most of a training step: a
# 64-channel mask head on at most 64 sampled RoIs per image (16 positives) trains 2.2x more
# images/s and reached AP50 0.83 within 15 minutes where 128 / 128 reached 0.46 (docs/instance.md).
SYNTHETIC_HEADS = {"mask_rcnn": {"mask_head_width": 64, "rois_per_image": 64}, "yolact": {}}


def _record(row: dict) -> None:
    row = {**row, "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as stream:
        stream.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


def _train_and_evaluate(values: dict, final_val: dict, label: str) -> None:
    from seglab.data.instance import collate_instances, open_instance_dataset
    from seglab.engine.checkpoint import load_checkpoint
    from seglab.engine.config import TrainConfig
    from seglab.engine.instance import InstanceTrainer, evaluate_instances

    trainer = InstanceTrainer(TrainConfig.from_dict(values))
    cpu_start = time.process_time()
    summary = trainer.fit()
    cpu_minutes = (time.process_time() - cpu_start) / 60
    dataset = open_instance_dataset(values["data"], "val", **final_val)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_instances)
    results = evaluate_instances(trainer.model, loader, trainer.train_set.classes, trainer.device)
    # The last epoch's weights too: where the cosine ends at zero they are what a fixed schedule
    # gives without any choice, while "best" is chosen on a few validation images per epoch.
    last = results
    if summary["best_epoch"] != summary["epochs_run"]:  # otherwise the same weights, already evaluated
        last_model, _ = load_checkpoint(Path(summary["run_dir"]) / "last")
        last = evaluate_instances(last_model, loader, trainer.train_set.classes)
    _record(
        {
            "benchmark": label,
            "model": values["model"],
            "encoder": values["encoder"],
            "train_wall_minutes": round(summary["seconds"] / 60, 2),
            "train_cpu_minutes": round(cpu_minutes, 2),
            "precision": trainer.precision.name,
            "model_kwargs": values["model_kwargs"],
            "anchor_size": trainer.model_kwargs.get("anchor_size"),  # the data-derived one where not given
            "fit_to_budget": values.get("fit_to_budget", False),
            "lr": values["lr"],
            "batch_size": values["batch_size"],
            "train_images_per_epoch": len(trainer.train_set),
            "epochs": summary["epochs_run"],
            "best_epoch": summary["best_epoch"],
            "val_images": len(dataset),
            **{k: round(results[k], 4) for k in ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar", "boundary_ap")},
            **{f"last_epoch_{k}": round(last[k], 4) for k in ("ap", "ap50", "ap75", "boundary_ap")},
            "val_images_per_second": round(results["images_per_second"], 2),
            "run_dir": summary["run_dir"],
        }
    )


def synthetic(args: argparse.Namespace) -> None:
    values = {
        "task": "instance", "model": args.model, "encoder": args.encoder, "name": f"bench-{args.model}-synthetic",
        "out": args.out, "data": "synthetic", "image_size": 128, "train_samples": args.epoch_images, "val_samples": 48,
        "epochs": args.epochs, "batch_size": args.batch_size or 8, "lr": args.lr, "scheduler": "cosine", "warmup_epochs": 0.5,
        "max_minutes": args.minutes, "fit_to_budget": args.fit_to_budget,
        "model_kwargs": {**SMALL_HEADS[args.model], **SYNTHETIC_HEADS[args.model], **dict(args.model_option or [])},
        "seed": args.seed,
    }
    _train_and_evaluate(values, {"num_samples": 200, "image_size": 128, "seed": args.seed}, "synthetic-128")


def dsb2018(args: argparse.Namespace) -> None:
    if not DSB2018.is_file():
        raise SystemExit(f"DSB2018 not found at {DSB2018}")
    values = {
        "task": "instance", "model": args.model, "encoder": args.encoder, "name": f"bench-{args.model}-dsb2018",
        "out": args.out, "data": str(DSB2018), "image_size": 256, "epochs": args.epochs, "batch_size": args.batch_size or 4, "lr": args.lr,
        "scheduler": "cosine", "warmup_epochs": 0.2, "max_minutes": args.minutes, "fit_to_budget": args.fit_to_budget, "val_samples": 16,
        # nuclei images hold up to a few hundred objects: keep up to 300 detections per image;
        # Mask R-CNN's anchors from 8 px, YOLACT's from the training boxes (the trainer's default)
        "model_kwargs": {
            **SMALL_HEADS[args.model], **({"anchor_size": 8} if args.model == "mask_rcnn" else {}),
            "detections_per_image": 300, **dict(args.model_option or []),
        },
        "seed": args.seed,
    }
    _train_and_evaluate(values, {}, "dsb2018")


def evaluate(args: argparse.Namespace) -> None:
    """The best checkpoint of a (possibly interrupted) benchmark run on a whole validation split."""
    from seglab.data.instance import collate_instances, open_instance_dataset
    from seglab.engine.checkpoint import load_checkpoint
    from seglab.engine.instance import evaluate_instances

    model, config = load_checkpoint(args.run_dir)
    if args.detections:
        _set_detection_limit(model, args.detections)
    data = dict(config["data"])
    source = data.pop("source")
    if source == "synthetic":
        data["num_samples"] = args.val_images
    dataset = open_instance_dataset(source, "val", **data)
    results = evaluate_instances(model, DataLoader(dataset, batch_size=4, collate_fn=collate_instances), config["classes"])
    epochs = [json.loads(line) for line in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
    _record(
        {
            "benchmark": f"evaluate-{Path(args.run_dir).name}",
            "detections_per_image": args.detections or config["kwargs"].get("detections_per_image"),
            "model": config["model"],
            "encoder": config["kwargs"].get("encoder"),
            "best_epoch": config["epoch"],
            "epochs_run": len(epochs),
            "train_cpu_minutes_at_best": round(epochs[config["epoch"] - 1]["budget_seconds"] / 60, 2),
            "train_cpu_minutes_total": round(epochs[-1]["budget_seconds"] / 60, 2),
            "train_wall_minutes_total": round(epochs[-1]["elapsed_seconds"] / 60, 2),
            "val_images": len(dataset),
            **{k: round(results[k], 4) for k in ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar", "boundary_ap")},
        }
    )


def _median_seconds(models: dict[str, torch.nn.Module], image: torch.Tensor, repeats: int, precision: str = "32",
                    float32: Sequence[str] = ()) -> dict[str, float]:
    """Median CPU time of one call per model (process time: other jobs on a shared machine do not
    count), the models taking turns in each round so that a slow phase of the machine hits all alike.
    The models named in `float32` run without the precision's autocast (a peer as its README runs it)."""
    timings: dict[str, list[float]] = {name: [] for name in models}
    autocast = resolve_precision(precision, torch.device("cpu")).autocast
    with torch.inference_mode():
        for step in range(repeats + 2):
            for name, model in models.items():
                with contextlib.nullcontext() if name in float32 else autocast():
                    start = time.process_time()
                    model([image])
                    if step >= 2:  # two warm-up rounds
                        timings[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def speed(args: argparse.Namespace) -> None:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    import seglab
    from seglab.models.instance.mask_rcnn import load_torchvision_weights

    torch.manual_seed(0)
    size = args.size
    image = torch.rand(3, size, size)
    common = {"num_classes": 91, "encoder": args.encoder}
    models = {
        "yolact": seglab.create_model("yolact", **common, anchor_size=max(8, size // 6)).eval(),
        "mask_rcnn": seglab.create_model("mask_rcnn", **common, min_size=size, max_size=size).eval(),
    }
    if args.encoder == "resnet50":
        torchvision_model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=size, max_size=size)
        models["torchvision_maskrcnn_resnet50_fpn"] = torchvision_model.eval()
        # The same (random) weights in both Mask R-CNNs: the same proposals and boxes reach the
        # RoI stages' NMS, so the two do equal work and only the implementations differ.
        load_torchvision_weights(models["mask_rcnn"], torchvision_model.state_dict())
    # Random weights give arbitrary scores; the RoI stages' cost depends on how many boxes
    # survive, so every model is made to return exactly `detections` boxes per image.
    for model in models.values():
        _force_detections(model, args.detections)
    peers_fp32 = {}
    if args.precision != "32":  # the same treatment for all three: channels_last, bf16 autocast
        if "torchvision_maskrcnn_resnet50_fpn" in models:  # and the peer as its README runs it: float32, eager
            peers_fp32["torchvision_maskrcnn_resnet50_fpn_fp32"] = copy.deepcopy(models["torchvision_maskrcnn_resnet50_fpn"])
        models = {name: to_channels_last(model) for name, model in models.items()}
    if args.fast:  # seglab's own models as `seglab eval` / `predict` run them, with and without Winograd
        for name in ("yolact", "mask_rcnn"):
            for label, winograd in (("fast", True), ("fast_direct", False)):
                models[f"{name}_{label}"] = optimize_instance_model(copy.deepcopy(models[name]), winograd=winograd,
                                                                    precision=args.precision)
    seconds = _median_seconds({**models, **peers_fp32}, image, args.repeats, args.precision, float32=tuple(peers_fp32))
    row = {"benchmark": f"speed-{size}", "encoder": args.encoder, "detections": args.detections, "repeats": args.repeats,
           "precision": args.precision, "threads": torch.get_num_threads()}
    row.update({f"{name}_ms": round(1000 * s, 1) for name, s in seconds.items()})
    row.update({f"{name}_gflops": round(_forward_flops(model, image) / 1e9, 1) for name, model in models.items()
                if "_fast" not in name})  # the fast rows compute the same network
    if peers_fp32 and args.fast:
        row["mask_rcnn_fast_speedup_vs_torchvision_fp32"] = round(
            seconds["torchvision_maskrcnn_resnet50_fpn_fp32"] / seconds["mask_rcnn_fast"], 3)
    row["yolact_speedup_vs_mask_rcnn"] = round(seconds["mask_rcnn"] / seconds["yolact"], 2)
    if args.fast:
        for name in ("yolact", "mask_rcnn"):
            row[f"{name}_fast_speedup_vs_eager"] = round(seconds[name] / seconds[f"{name}_fast"], 3)
            row[f"{name}_winograd_speedup"] = round(seconds[f"{name}_fast_direct"] / seconds[f"{name}_fast"], 3)
    if "torchvision_maskrcnn_resnet50_fpn" in seconds:
        row["mask_rcnn_speedup_vs_torchvision"] = round(seconds["torchvision_maskrcnn_resnet50_fpn"] / seconds["mask_rcnn"], 3)
    _record(row)


def keypoint_speed(args: argparse.Namespace) -> None:
    """Our Keypoint R-CNN against torchvision's keypointrcnn_resnet50_fpn with the same (random)
    weights, eager and on seglab's fast path, as `speed` times the Mask R-CNNs."""
    from torchvision.models.detection import keypointrcnn_resnet50_fpn

    import seglab
    from seglab.models.instance.mask_rcnn import load_torchvision_weights

    torch.manual_seed(0)
    size = args.size
    image = torch.rand(3, size, size)
    torchvision_model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, num_keypoints=17,
                                                  min_size=size, max_size=size).eval()
    ours = seglab.create_model("keypoint_rcnn", num_classes=2, num_keypoints=17, encoder="resnet50", min_size=size,
                               max_size=size).eval()
    load_torchvision_weights(ours, torchvision_model.state_dict())
    models = {"torchvision_keypointrcnn_resnet50_fpn": torchvision_model, "keypoint_rcnn": ours}
    for model in models.values():
        _force_detections(model, args.detections)
    peers_fp32 = {}
    if args.precision != "32":  # the peer also as its README runs it: float32, eager
        peers_fp32["torchvision_keypointrcnn_resnet50_fpn_fp32"] = copy.deepcopy(torchvision_model)
        models = {name: to_channels_last(model) for name, model in models.items()}
    models["keypoint_rcnn_fast"] = optimize_instance_model(copy.deepcopy(ours), precision=args.precision)
    seconds = _median_seconds({**models, **peers_fp32}, image, args.repeats, args.precision, float32=tuple(peers_fp32))
    row = {"benchmark": f"keypoint-speed-{size}", "encoder": "resnet50", "detections": args.detections,
           "repeats": args.repeats, "precision": args.precision, "threads": torch.get_num_threads()}
    row.update({f"{name}_ms": round(1000 * s, 1) for name, s in seconds.items()})
    row["keypoint_rcnn_gflops"] = round(_forward_flops(ours, image) / 1e9, 1)
    reference = seconds["torchvision_keypointrcnn_resnet50_fpn"]
    row.update({f"{name}_speedup_vs_torchvision": round(reference / seconds[name], 3)
                for name in ("keypoint_rcnn", "keypoint_rcnn_fast")})
    if peers_fp32:
        row["keypoint_rcnn_fast_speedup_vs_torchvision_fp32"] = round(
            seconds["torchvision_keypointrcnn_resnet50_fpn_fp32"] / seconds["keypoint_rcnn_fast"], 3)
    _record(row)


def _forward_flops(model: torch.nn.Module, image: torch.Tensor) -> float:
    """FLOPs (2 per multiply-add) of one inference call, counted by torch.utils.flop_counter:
    convolutions and matrix products; RoIAlign (as torchvision's op), NMS and pasting count nothing."""
    from torch.utils.flop_counter import FlopCounterMode

    from seglab.models.profile import counting_roi_align_as_torchvision

    with counting_roi_align_as_torchvision(model), FlopCounterMode(display=False) as counter, torch.inference_mode():
        model([image])
    return counter.get_total_flops()


def _set_detection_limit(model: torch.nn.Module, detections: int) -> None:
    if hasattr(model, "roi_heads"):
        model.roi_heads.detections_per_img = detections
    else:
        model.detections_per_image = detections


def _force_detections(model: torch.nn.Module, detections: int) -> None:
    """Exactly `detections` boxes per image: no score threshold (and no NMS for Mask R-CNN)."""
    _set_detection_limit(model, detections)
    if hasattr(model, "roi_heads"):
        model.roi_heads.score_thresh = 0.0
        model.roi_heads.nms_thresh = 1.0
    else:
        model.score_threshold = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, function, minutes, lr in (("synthetic", synthetic, 15.0, 5e-4), ("dsb2018", dsb2018, 20.0, 5e-4)):
        command = commands.add_parser(name)
        command.add_argument("--model", choices=["mask_rcnn", "yolact"], required=True)
        command.add_argument("--encoder", default="resnet18")
        command.add_argument("--minutes", type=float, default=minutes)
        command.add_argument("--lr", type=float, default=lr)
        command.add_argument("--batch-size", type=int, help="images per step (default: 8 synthetic, 4 DSB2018)")
        command.add_argument("--epoch-images", type=int, default=1000, help="synthetic training images (one epoch)")
        command.add_argument("--epochs", type=int, default=12, help="epochs of the cosine schedule (the budget may stop it earlier)")
        command.add_argument("--fit-to-budget", action="store_true", help="end the cosine with the last epoch that fits --minutes")
        command.add_argument("--model-option", action="append", type=parse_model_option, metavar="KEY=VALUE",
                             help="override a model option, e.g. mask_head_width=256 (repeatable)")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--out", default="runs")
        command.set_defaults(run=function)
    command = commands.add_parser("evaluate")
    command.add_argument("--run-dir", required=True, help="a benchmark run directory (its best checkpoint)")
    command.add_argument("--val-images", type=int, default=200, help="synthetic validation images")
    command.add_argument("--detections", type=int, help="override the checkpoint's detections per image")
    command.set_defaults(run=evaluate)
    command = commands.add_parser("speed")
    command.add_argument("--size", type=int, default=512)
    command.add_argument("--encoder", default="resnet50")
    command.add_argument("--detections", type=int, default=20)
    command.add_argument("--repeats", type=int, default=5)
    command.add_argument("--precision", choices=["32", "bf16"], default="32",
                         help="32 (default), or bf16 autocast + channels_last for every model (CPUs with native bf16)")
    command.add_argument("--fast", action="store_true",
                         help="also time seglab's models after optimize_instance_model, with and without Winograd")
    command.set_defaults(run=speed)
    command = commands.add_parser("keypoint-speed")
    command.add_argument("--size", type=int, default=512)
    command.add_argument("--detections", type=int, default=20)
    command.add_argument("--repeats", type=int, default=5)
    command.add_argument("--precision", choices=["32", "bf16"], default="32")
    command.set_defaults(run=keypoint_speed)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
