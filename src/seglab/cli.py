"""The `seglab` command line: train | eval | predict | export | models | bench | data check.

Every command takes `--help`. Bad input (missing files, unknown names, invalid values) ends
with one line `seglab: error: ...` and exit code 2; set SEGLAB_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2


class CommandError(Exception):
    """A user mistake reported as one line and exit code 2."""


DETECTION_TASKS = ("instance", "keypoint")  # trained, scored and served by the instance engine's loops


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


MIN_IMAGE_SIZE = 8  # pixels a side: what training takes (TrainConfig), and so what evaluation scores


def _image_size(text: str) -> int | list[int]:
    """`64` or `240x180` (width x height, as people write image sizes) -> int or [h, w]."""
    try:
        if "x" in text.lower():
            width, height = (int(part) for part in text.lower().split("x"))
            sides: int | list[int] = [height, width]
        else:
            sides = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be N or WIDTHxHEIGHT, not {text!r}") from None
    if min(sides if isinstance(sides, list) else [sides]) < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_IMAGE_SIZE} pixels a side, not {text!r}")
    return sides


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, not {text}")
    return value


def _float_list(text: str) -> list[float]:
    """`0.75,1,1.25` -> [0.75, 1.0, 1.25]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, not {text!r}") from None


def _class_weights(text: str) -> str | list[float]:
    return text if text == "median_frequency" else _float_list(text)


def _without_option(argv: Sequence[str], flag: str) -> list[str]:
    """argv minus `flag VALUE` / `flag=VALUE` (how `--nproc` hands the command to its workers)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            kept.append(item)
    return kept


def _launch_workers(args: argparse.Namespace) -> int | None:
    """With `--nproc N` (N > 1) outside a distributed job, run the command in N processes."""
    if getattr(args, "nproc", None) in (None, 1) or "WORLD_SIZE" in os.environ:
        return None
    from seglab.engine.distributed import launch

    return launch(args.nproc, _without_option(args.argv, "--nproc"))


def parse_model_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as YAML (8 -> int, 0.5 -> float, true -> bool, [1,2] -> list)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE with KEY an option name, not {text!r}")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r}") from None


# ----------------------------------------------------------------------------------- train
DIRECT_CONVOLUTIONS_HELP = ("on the CPU: keep eager PyTorch's convolutions, without Winograd's 3x3 ones (float32's, and "
                            "bf16's for the widest) and, in float32 training, the weight-gradient kernels timed per "
                            "shape (the same function, rounding-level differences; docs/bench.md)")
TRAIN_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--name", dict(help="run name (default: <model>-<data>); the run goes to <out>/<name>")),
    ("--out", dict(help="folder that holds the runs (default: runs)")),
    ("--task", dict(choices=["semantic", "instance", "keypoint"],
                    help="semantic (default) or instance segmentation, or keypoints (Keypoint R-CNN, pose)")),
    ("--model", dict(help="registered model name (see `seglab models`; default: unet)")),
    ("--encoder", dict(help="encoder/backbone name for models that take one (e.g. resnet34)")),
    ("--model-option", dict(dest="model_option", metavar="KEY=VALUE", action="append", type=parse_model_option,
                            help="an option of the model's builder, e.g. output_stride=8 or mask_head_width=128 (repeatable; "
                                 "merged over the config's model_kwargs; see `seglab models`)")),
    ("--data", dict(help="'synthetic' (default, built in) or a data set folder")),
    ("--format", dict(help="data set layout of --data: folder, voc, camvid, cityscapes, ade20k or coco; instance data "
                           "coco or instance (default: detected)")),
    ("--num-classes", dict(type=_positive_int, help="classes of the synthetic set (2-6)")),
    ("--image-size", dict(type=_image_size, help="training size: N or WIDTHxHEIGHT")),
    ("--train-samples", dict(type=_positive_int, help="synthetic training images")),
    ("--val-samples", dict(type=_positive_int, help="synthetic validation images (instance training on a data set: "
                                                    "the first N validation images scored each epoch, default 100)")),
    ("--epochs", dict(type=int, help="number of epochs")),
    ("--batch-size", dict(type=int, help="images per batch")),
    ("--lr", dict(type=float, help="peak learning rate")),
    ("--weight-decay", dict(type=float, help="weight decay")),
    ("--optimizer", dict(choices=["adamw", "sgd"], help="adamw (default) or sgd with momentum 0.9")),
    ("--scheduler", dict(choices=["cosine", "poly", "constant"], help="learning-rate schedule")),
    ("--loss", dict(help="loss, e.g. ce, dice, ce+dice, 0.5*ce+lovasz")),
    ("--class-weights", dict(type=_class_weights, help="per-class loss weights: w0,w1,... or median_frequency")),
    ("--warmup-epochs", dict(type=float, help="linear learning-rate warm-up (epochs, may be fractional; "
                                              "default: the model's or encoder's recipe, 1 for SegFormer and mit_b* "
                                              "encoders, else 0)")),
    ("--precision", dict(choices=["auto", "32", "bf16", "16"], help="auto (default: bf16 where the hardware runs it natively, else 32, with --int8-products on CPUs with VNNI or AMX), 32 (float32 throughout), bf16, 16 (CUDA)")),
    ("--direct-convolutions", dict(action="store_const", const=True, help=DIRECT_CONVOLUTIONS_HELP)),
    ("--int8-products", dict(action=argparse.BooleanOptionalAction,
                             help="float32 training on a CPU with VNNI or AMX: the large 1x1 convolutions' (and the ASPP's "
                                  "atrous windows') forward and input gradient as int8 products with one scale per "
                                  "row, weight gradients in "
                                  "float32 (not exact; docs/engine.md). Default: on where --precision auto trains "
                                  "in float32 on such a CPU (no native bf16); --precision 32 keeps float32 throughout")),
    ("--native-norms", dict(action=argparse.BooleanOptionalAction,
                            help="bf16 training on the CPU: BatchNorm with the ReLU, or a ResNet block's shortcut "
                                 "addition and ReLU, after it by one native kernel (2-4.5%% faster steps; mIoU within "
                                 "0.5 points over ten seeds, docs/bench.md). Default: on wherever training runs in "
                                 "bf16 on the CPU; --no-native-norms keeps PyTorch's norms")),
    ("--native-attention", dict(action=argparse.BooleanOptionalAction,
                                help="bf16 training on the CPU with AVX-512 BF16: SegFormer's attention heads by the "
                                     "native kernel forward, which keeps its softmax, and its own backward (1.16-1.17x "
                                     "faster steps; mIoU within 0.5 points over ten seeds, docs/engine.md). Default: "
                                     "on wherever training runs so; --no-native-attention keeps PyTorch's attention")),
    ("--native-mix-ffn", dict(action=argparse.BooleanOptionalAction,
                              help="bf16 training on the CPU: SegFormer's Mix-FFN depthwise convolution and GELU by "
                                   "one native kernel forward and one backward (docs/engine.md). Default: on wherever "
                                   "training runs in bf16 on the CPU; --no-native-mix-ffn keeps PyTorch's operators")),
    ("--int8-calibration", dict(action=argparse.BooleanOptionalAction,
                                help="CPU runs on a CPU with VNNI or AMX: end by storing int8 input ranges "
                                     "in the best checkpoint, checked on the validation split, so that `seglab predict` "
                                     "can run int8 without calibration images (default: on; docs/engine.md)")),
    ("--deterministic", dict(action="store_const", const=True,
                             help="the same bits in every run from the same seed on the same machine: on the CPU "
                                  "the float32 weight-gradient kernels are fixed instead of timed at the first step; "
                                  "on a GPU cuDNN's and PyTorch's deterministic algorithms")),
    ("--accumulate", dict(type=int, help="gradient accumulation: one optimiser step every N batches")),
    ("--clip-grad-norm", dict(type=_positive_float, help="clip the gradient norm to this value")),
    ("--ema-decay", dict(type=float, help="keep and evaluate an EMA of the weights, e.g. 0.999")),
    ("--patience", dict(type=int, help="early stopping: stop after N epochs without a better mIoU")),
    ("--sync-bn", dict(action="store_const", const=True, help="multi-process: BatchNorm over the global batch")),
    ("--tensorboard", dict(action="store_const", const=True, help="also log to <run>/tensorboard")),
    ("--max-minutes", dict(type=float, help="stop after the epoch that crosses this time budget")),
    ("--fit-to-budget", dict(action="store_const", const=True, help="end the learning-rate schedule with the last epoch that fits --max-minutes (re-estimated after each epoch)")),
    ("--workers", dict(type=int, help="data loader processes")),
    ("--seed", dict(type=int, help="random seed (default 0)")),
    ("--device", dict(help="auto (default), cpu, cuda, cuda:N")),
]


def _train(args: argparse.Namespace, console: Console) -> int:
    from seglab.engine.config import TrainConfig, load_yaml

    if getattr(args, "nproc", None) not in (None, 1) and (task := _requested_task(args)) != "semantic":
        # Checked before the processes start: each would otherwise train the whole model alone.
        raise CommandError(f"--nproc: {task} training runs in one process; data-parallel training is for semantic models")
    workers_code = _launch_workers(args)
    if workers_code is not None:
        return workers_code
    given = {}
    for flag, _ in TRAIN_OPTIONS:
        key = flag.lstrip("-").replace("-", "_")
        if getattr(args, key, None) is not None:
            given[key] = getattr(args, key)
    model_options = dict(given.pop("model_option", None) or [])
    from seglab.engine.distributed import shutdown_distributed
    from seglab.engine.trainer import Trainer

    if args.resume:
        if args.config or model_options:
            raise CommandError("--resume takes its options from the run directory; drop --config and --model-option")
        if (task := _run_task(args.resume)) != "semantic":
            return _detection_training(task)(given, console, resume=args.resume)
        trainer = Trainer.resume(args.resume, given, console=console)
    else:
        values = {**(load_yaml(args.config) if args.config else {}), **given}
        if model_options:
            values["model_kwargs"] = {**(values.get("model_kwargs") or {}), **model_options}
        _match_task_to_model(values)
        _reject_synthetic_sizes(given, values)
        if values.get("task") in DETECTION_TASKS:
            return _detection_training(values["task"])(values, console)
        config = TrainConfig.from_dict(values, source=str(args.config or "options"))
        if config.task != "semantic":
            raise CommandError(f"--task {config.task} is not available in this version")
        trainer = Trainer(config, console=console)
    try:
        summary = trainer.fit()
    finally:
        shutdown_distributed()
    if not trainer.dist.is_main:
        return 0
    out = Console()
    out.print(f"Best validation mIoU {summary['miou']:.4f} (epoch {summary['best_epoch']}), pixel accuracy {summary['pixel_accuracy']:.4f}, {summary['seconds']:.0f} s")
    out.print(f"Results in {summary['run_dir']}/  (best.safetensors, metrics.jsonl, curves.png, overlays/)")
    return 0


def _detection_training(task: str) -> Any:
    """The entry point that trains `task` ("instance" or "keypoint") from the command line's values."""
    if task == "keypoint":
        from seglab.engine.keypoints import train_keypoints

        return train_keypoints
    from seglab.engine.instance import train_instance

    return train_instance


# ------------------------------------------------------------------------------------ eval
def _eval(args: argparse.Namespace, console: Console) -> int:
    from torch.utils.data import DataLoader

    from seglab.data import open_dataset
    from seglab.data.files import equal_size_batches
    from seglab.engine.checkpoint import check_data_classes, load_checkpoint
    from seglab.engine.evaluator import Normalize, evaluate
    from seglab.engine.fastpath import optimize_for_inference
    from seglab.engine.int8 import require_int8
    from seglab.engine.int8_checkpoint import auto_inference_precision, calibration_images, stored_int8
    from seglab.engine.precision import resolve_precision
    from seglab.engine.trainer import resolve_device
    from seglab.files import output_folder
    from seglab.metrics.report import format_report, results_to_json

    model, config = load_checkpoint(args.checkpoint)
    if args.json:  # an unusable --json is one line now, not after the evaluation
        output_folder(Path(args.json).parent)
    if config.get("task") in DETECTION_TASKS:
        from seglab.engine.instance import eval_instance
        from seglab.engine.keypoints import eval_keypoints

        _reject_semantic_options(args, args.checkpoint, ("crf", "crf_params", "store_int8_ranges"), config["task"])
        return (eval_keypoints if config["task"] == "keypoint" else eval_instance)(model, config, args, console)
    device = resolve_device(args.device)
    _check_store_int8_ranges(args)
    # auto: what `seglab predict` runs by default, int8 with the checkpoint's ranges where they allow it
    record = stored_int8(config, f"{args.checkpoint}'s config", lenient=True) if args.precision == "auto" else None
    chosen = auto_inference_precision(device, record, model) if args.precision == "auto" else args.precision
    int8 = chosen == "int8"
    if int8:
        require_int8(device)
    precision = "int8" if int8 else resolve_precision(chosen, device).name  # refused before any data is read
    ranges = record.ranges if int8 and args.precision == "auto" else None
    # By default, the data set (and options) the model was trained on.
    data = dict(config.get("data", {"source": "synthetic"}))
    source = data.pop("source")
    if args.data and args.data != source:
        source, data = args.data, ({} if args.data == "synthetic" else {"format": args.format})
    if args.image_size is not None:
        data["image_size"] = args.image_size
    if source != "synthetic":
        data["augment"] = False  # scored as they are: `--split train` would otherwise draw random flips and crops
    dataset = open_dataset(source, args.split, **data)
    check_data_classes(config["classes"], dataset.classes, f"the {args.split} split of {source}")
    # Images scored at their own sizes, where those differ, go in batches of one size each.
    batches = equal_size_batches(dataset, args.batch_size) if data.get("image_size") is None else None
    loader = DataLoader(dataset, batch_size=args.batch_size) if batches is None else DataLoader(dataset, batch_sampler=batches)
    normalize = Normalize(config["mean"], config["std"])
    calibration = None
    if int8 and ranges is None:  # the scales come from training images, not from the images scored
        try:
            train_split = open_dataset(source, "train", **data)
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(f"--precision int8 calibrates on the train split of {source}: {error}") from None
        if len(train_split) == 0:
            raise CommandError(f"--precision int8 calibrates on the train split of {source}, which has no images")
        calibration = calibration_images(train_split, normalize, args.calibration_images)
    # The fast inference path (conv-BN folding, fused activations, channels_last) in the chosen
    # precision; at the default 32 it changes outputs only at rounding level.
    prepared = optimize_for_inference(model.to(device), precision, winograd=not args.direct_convolutions,
                                      calibration=calibration, int8_ranges=ranges)
    if args.precision == "auto":
        console.print(f"--precision auto: {_precision_name(precision)}" + (" with the checkpoint's int8 ranges" if ranges else ""))
    scoring = dict(num_classes=len(config["classes"]), ignore_index=config.get("ignore_index", 255),
                   normalize=normalize, device=device)
    results = evaluate(prepared, loader, crf=_crf_option(args), **scoring)
    Console().print(format_report(results, config["classes"], title=f"{args.split} split of {source} ({len(dataset)} images)"))
    if args.json:
        results_to_json(results, args.json, class_names=config["classes"])
        console.print(f"metrics written to {args.json}")
    if args.store_int8_ranges:
        _store_int8_ranges(args, model, prepared, results, loader, scoring, len(calibration), console)
    return 0


def _check_store_int8_ranges(args: argparse.Namespace) -> None:
    if args.store_int8_ranges and args.precision != "int8":
        raise CommandError("--store-int8-ranges: only with --precision int8")
    if args.store_int8_ranges and (args.crf or args.crf_params):
        raise CommandError("--store-int8-ranges: the stored mIoU values are the network's own; drop --crf")


def _store_int8_ranges(args: argparse.Namespace, model: Any, prepared: Any, results: dict[str, Any], loader: Any,
                       scoring: dict[str, Any], images: int, console: Console) -> None:
    """Add the int8 record (seglab.engine.int8_checkpoint) to the checkpoint's JSON: the ranges
    just calibrated, this split's int8 mIoU and its float32 mIoU, scored now."""
    from seglab.engine.checkpoint import update_checkpoint_config
    from seglab.engine.evaluator import evaluate
    from seglab.engine.fastpath import optimize_for_inference
    from seglab.engine.int8 import int8_input_ranges
    from seglab.engine.int8_checkpoint import Int8Record

    ranges = int8_input_ranges(prepared.model)
    if not ranges:
        raise CommandError(f"--store-int8-ranges: no convolution of {args.checkpoint} takes int8; nothing stored")
    float32 = evaluate(optimize_for_inference(model, "32", winograd=not args.direct_convolutions), loader, **scoring)
    record = Int8Record(ranges, images, float(float32["miou"]), float(results["miou"]))
    if not record.finite():
        raise CommandError(f"--store-int8-ranges: {args.checkpoint} gave ranges or mIoU values that are not finite; nothing stored")
    written = update_checkpoint_config(args.checkpoint, int8=record.to_json())
    verdict = "within" if record.within() else "not within"
    console.print(f"int8 ranges stored in {written}: mIoU {record.miou_int8:.4f} against {record.miou_float32:.4f} in "
                  f"float32, {verdict} 0.2 points (`seglab predict --precision auto` runs int8 only within)")


def _requested_task(args: argparse.Namespace) -> str:
    """The task `seglab train` would run with these arguments: the resumed run's, or --task,
    or the model's (from --model or the config file)."""
    from seglab.engine.config import load_yaml

    if args.resume:
        return _run_task(args.resume)
    values = {**(load_yaml(args.config) if args.config else {}),
              **{k: v for k in ("task", "model") if (v := getattr(args, k, None)) is not None}}
    _match_task_to_model(values)
    return str(values.get("task") or "semantic")


def _run_task(run_dir: str) -> str:
    """The task a run directory's config.yaml names (semantic when it names none or is absent:
    `Trainer.resume` then says what is missing)."""
    from seglab.engine.config import load_yaml

    config_file = Path(run_dir) / "config.yaml"
    return str(load_yaml(config_file).get("task", "semantic")) if config_file.is_file() else "semantic"


def _match_task_to_model(values: dict[str, Any]) -> None:
    """The task follows the model where none is given (`--model mask_rcnn` trains an instance
    model); a task the model does not do, or a model `seglab train` cannot train, is one line."""
    if not values.get("model"):
        return
    from seglab.models.registry import get_model_entry

    model_task = get_model_entry(str(values["model"])).task
    if model_task not in ("semantic", *DETECTION_TASKS):
        raise CommandError(f"--model {values['model']} is {_a(model_task)} model; seglab train trains semantic, "
                           f"instance and keypoint models (build it with seglab.create_model and train it on your own targets)")
    task = values.get("task")
    if task is None:
        values["task"] = model_task
    elif task != model_task:
        raise CommandError(f"--model {values['model']} is {_a(model_task)} model, not {_a(task)} one; "
                           f"drop --task or give {_a(task)} model (see `seglab models --task {task}`)")


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _reject_synthetic_sizes(given: dict[str, Any], values: dict[str, Any]) -> None:
    """--train-samples and --val-samples size the synthetic set; on a data set they are an error,
    not silently ignored (except --val-samples of instance training: the images each epoch scores)."""
    data = values.get("data", "synthetic")
    if data == "synthetic":
        return
    sized = ["train_samples"] + ([] if values.get("task") in DETECTION_TASKS else ["val_samples"])
    flags = ["--" + name.replace("_", "-") for name in sized if name in given]
    if flags:
        raise CommandError(f"{', '.join(flags)}: for the synthetic set only; {data} is a data set, trained on all its images")


def _reject_semantic_options(args: argparse.Namespace, checkpoint: str, names: tuple[str, ...], task: str) -> None:
    """Options that only semantic models use are an error, not silently ignored, for an instance
    (or keypoint) checkpoint."""
    given = ["--" + name.replace("_", "-") for name in names if getattr(args, name, None)]
    if given:
        raise CommandError(f"{', '.join(given)}: for semantic models only; {checkpoint} is {_a(task)} model")


def _crf_params(args: argparse.Namespace) -> dict[str, float | int] | None:
    """--crf / --crf-params (which implies --crf): the dense CRF's parameter overrides, or None."""
    if not (args.crf or args.crf_params):
        return None
    from seglab.crf import parse_crf_params

    return parse_crf_params(args.crf_params)


def _crf_option(args: argparse.Namespace) -> Any:
    params = _crf_params(args)
    if params is None:
        return None
    from seglab.crf import make_crf

    return make_crf(params)


# --------------------------------------------------------------------------------- predict
def _predict(args: argparse.Namespace, console: Console) -> int:
    workers_code = _launch_workers(args)
    if workers_code is not None:
        return workers_code
    from seglab.engine.checkpoint import read_checkpoint_config
    from seglab.engine.distributed import env_rank
    from seglab.engine.predictor import Predictor
    from seglab.engine.trainer import progress_bar
    from seglab.files import output_folder

    checkpoint_config = read_checkpoint_config(args.checkpoint)
    task = checkpoint_config.get("task", "semantic")
    is_instance = task in DETECTION_TASKS
    if args.tile is None:
        for flag, value in (("--overlap", args.overlap), ("--tile-batch", args.tile_batch)):
            if value is not None:
                raise CommandError(f"{flag}: only with --tile (sliding-window prediction)")
    if is_instance:
        _reject_semantic_options(args, args.checkpoint, ("crf", "crf_params", "tile", "tta_flips", "tta_scales", "calibration",
                                                         "calibration_images"), task)
        if args.precision == "int8":
            raise CommandError(f"--precision int8: for semantic models only; {args.checkpoint} is {_a(task)} model")
    elif args.score_threshold is not None:
        raise CommandError(f"--score-threshold: for instance and keypoint models only; {args.checkpoint} is a semantic model")
    output_folder(args.out)  # before any progress bar, so a bad --out is the only line printed
    unreadable: list[tuple[Path, str]] = []  # images skipped, named after the others are written
    if is_instance:
        from seglab.engine.instance_predictor import predict_instance
        from seglab.engine.keypoints import predict_keypoints

        (predict_keypoints if task == "keypoint" else predict_instance)(args, console, unreadable)
        return _report_unreadable(unreadable)

    tiling = {name: value for name, value in (("overlap", args.overlap), ("tile_batch", args.tile_batch)) if value is not None}
    predictor = Predictor.from_checkpoint(
        args.checkpoint, device=args.device, tile=args.tile, **tiling,
        tta_flips=list(args.tta_flips or ""), tta_scales=args.tta_scales or [1.0], precision=args.precision,
        batch_size=args.batch_size, crf=_crf_params(args), winograd=not args.direct_convolutions,
        calibration=_calibration_images(args, stored_ranges="int8" in checkpoint_config),
    )
    context = env_rank()
    with progress_bar(console, disable=not context.is_main) as progress:
        written = predictor.predict_files(args.images, args.out, progress=progress, overlays=args.overlays,
                                          unreadable=unreadable)
    if context.is_main:
        share = f" by rank 0 of {context.world_size} (each rank its own shard)" if context.enabled else ""
        images = sum(path.name.endswith("_mask.png") for path in written)
        Console().print(f"{images} image(s) predicted{share} in {_precision_words(predictor)}; "
                        f"{'masks and overlays' if args.overlays else 'masks'} in {os.path.normpath(args.out)}/")
    return _report_unreadable(unreadable)  # each rank names the files of its own shard


UNREADABLE_LISTED = 20


def _report_unreadable(unreadable: list[tuple[Path, str]]) -> int:
    """One error line per image `seglab predict` skipped (the first UNREADABLE_LISTED) and the
    exit status: non-zero when any was skipped, so scripts see it after the rest was written."""
    for _, reason in unreadable[:UNREADABLE_LISTED]:
        print(f"seglab: error: skipped {reason}", file=sys.stderr)
    if len(unreadable) > UNREADABLE_LISTED:
        print(f"seglab: error: ... and {len(unreadable) - UNREADABLE_LISTED} more unreadable image(s)", file=sys.stderr)
    return EXIT_BAD_INPUT if unreadable else 0


def _calibration_images(args: argparse.Namespace, stored_ranges: bool) -> list[Any] | None:
    """--precision int8's calibration images: --calibration's; else none where the checkpoint
    stores its int8 ranges, else the first of the images to predict."""
    if args.precision != "int8":
        for flag, value in (("--calibration", args.calibration), ("--calibration-images", args.calibration_images)):
            if value:
                raise CommandError(f"{flag}: only with --precision int8")
        return None
    if stored_ranges and not args.calibration:
        return None
    from seglab.data.io import list_images, read_image

    files = list_images(args.calibration or args.images)
    if not files:
        raise CommandError(f"--calibration: no image files in {' '.join(args.calibration or args.images)}")
    return [read_image(file) for file in files[: args.calibration_images or INT8_CALIBRATION_IMAGES]]


def _precision_name(precision: str) -> str:
    return {"32": "float32", "16": "float16"}.get(precision, precision)


def _precision_words(predictor: Any) -> str:
    """How the predictions were computed, e.g. "int8 (the checkpoint's ranges; ...)"."""
    words = _precision_name(predictor.precision)
    if predictor.precision == "int8" and predictor.int8_ranges_used:
        from seglab.engine.fastpath import default_precision

        record = predictor.int8_record
        others = "bf16 for bf16, 32 for float32" if default_precision(predictor.device) == "bf16" else "32 for float32"
        words += (f" (the checkpoint's ranges; validation mIoU {record.miou_int8:.4f} against "
                  f"{record.miou_float32:.4f} in float32; --precision {others})")
    return words


# ---------------------------------------------------------------------------------- export
def _export(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from seglab.engine.checkpoint import checkpoint_stem, load_checkpoint
    from seglab.engine.exporting import export_checkpoint
    from seglab.files import output_folder

    model, config = load_checkpoint(args.checkpoint)
    # Default: the run's or checkpoint's name in the current folder ("model.v2" keeps its dot).
    name = checkpoint_stem(Path(args.checkpoint)).name + (".onnx" if args.format == "onnx" else ".pt")
    # A folder (one that exists, or any --out ending in a slash, made here): the file goes in it.
    folder = bool(args.out) and (Path(args.out).is_dir() or args.out.endswith(("/", os.sep)))
    out = output_folder(args.out) / name if folder else Path(args.out or name)
    export_checkpoint(model, config, out, format=args.format, image_size=args.image_size, dynamic=not args.static,
                      legacy_onnx=args.legacy_onnx)
    outputs = {"instance": "boxes, labels, scores, masks", "keypoint": "boxes, labels, scores, keypoints, keypoints_scores"}
    task = config.get("task", "semantic")
    what = (f"input: one float image 1 x C x H x W in [0, 1], outputs: {outputs[task]}" if task in outputs else
            "input: float image in [0, 1], output: logits")
    Console().print(f"exported {config['model']} ({args.format}, {what}) to {out}")
    return 0


# ---------------------------------------------------------------------------------- models
def _models(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from seglab.models import get_model_entry, list_models

    table = Table(title="seglab models")
    for column in ("name", "task", "paper"):
        table.add_column(column)
    for name in list_models(args.task):
        entry = get_model_entry(name)
        table.add_row(name, entry.task, entry.paper)
    Console().print(table)
    return 0


# ----------------------------------------------------------------------------------- bench
def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, not {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers, not {text!r}")
    return values


def _bench(args: argparse.Namespace, console: Console) -> int:
    from seglab.bench import bench_command

    options = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    return bench_command(options, console)


# ------------------------------------------------------------------------------ data check
def _data_check(args: argparse.Namespace, console: Console) -> int:
    from seglab.data.doctor import check_dataset, render_report
    from seglab.files import atomic_write_json, output_folder

    if args.json:  # an unusable --json is one line now, not after reading every file
        output_folder(Path(args.json).parent)
    report = check_dataset(args.path, args.format)
    render_report(report, Console())
    if args.json:
        atomic_write_json(args.json, report.to_dict())
        console.print(f"report written to {args.json}")
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------- parser
INT8_CALIBRATION_IMAGES = 16  # seglab.engine.int8_checkpoint.CALIBRATION_IMAGES (not imported: --help stays light)
TILE_OVERLAP, TILE_BATCH = 0.25, 4  # Predictor's defaults, for --help (not imported: --help stays light)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seglab", description="Image segmentation: train, evaluate, predict.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a model (default: U-Net on the built-in synthetic shapes)")
    train.add_argument("--config", help="YAML file of training options (the command line wins)")
    for flag, options in TRAIN_OPTIONS:
        train.add_argument(flag, **options)
    train.add_argument("--resume", metavar="RUN", help="continue the run in this run directory from its last epoch")
    train.add_argument("--nproc", type=_positive_int, help="data-parallel processes on this machine (like torchrun)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a data set split")
    evaluate.add_argument("--checkpoint", required=True, help="run directory or .safetensors checkpoint")
    evaluate.add_argument("--data", help="data set (default: the one the model was trained on)")
    evaluate.add_argument("--format", help="data set layout of --data (default: detected)")
    evaluate.add_argument("--split", default="val", help="split to evaluate (default: val)")
    evaluate.add_argument("--image-size", type=_image_size, help="resize images to N or WIDTHxHEIGHT")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8)
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--precision", choices=["32", "auto", "bf16", "16", "int8"], default="32",
                          help="precision of the fast inference path (32: float32, the default; auto: what "
                               "`seglab predict` runs by default; int8: 8-bit products, calibrated on the train "
                               "split, CPUs with VNNI or AMX)")
    evaluate.add_argument("--calibration-images", type=_positive_int, default=INT8_CALIBRATION_IMAGES,
                          help=f"--precision int8: training images its scales come from (default {INT8_CALIBRATION_IMAGES})")
    evaluate.add_argument("--store-int8-ranges", action="store_true",
                          help="--precision int8: also score float32 and store the int8 ranges with both mIoU values "
                               "in the checkpoint's JSON (what `seglab train` stores on CPUs with VNNI or AMX; "
                               "for checkpoints trained elsewhere, docs/engine.md)")
    evaluate.add_argument("--direct-convolutions", action="store_true", help=DIRECT_CONVOLUTIONS_HELP)
    evaluate.add_argument("--crf", action="store_true", help="refine predictions with a dense CRF (docs/crf.md)")
    evaluate.add_argument("--crf-params", help="dense CRF parameters, e.g. theta_alpha=60,w1=5 (implies --crf)")
    evaluate.set_defaults(run=_eval)

    predict = commands.add_parser("predict", help="predict masks for images or folders of images")
    predict.add_argument("--checkpoint", required=True, help="run directory or .safetensors checkpoint")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--batch-size", type=_positive_int, default=4, help="images of equal size per forward pass")
    predict.add_argument("--tile", type=_positive_int, help="sliding-window inference with tiles of this side")
    predict.add_argument("--overlap", type=float, help=f"with --tile: tile overlap fraction (default {TILE_OVERLAP})")
    predict.add_argument("--tile-batch", type=_positive_int,
                         help=f"with --tile: tiles per forward pass (bounds memory; default {TILE_BATCH})")
    predict.add_argument("--tta-flips", choices=["h", "v", "hv"], help="test-time flips: h, v or hv")
    predict.add_argument("--tta-scales", type=_float_list, help="test-time scales, e.g. 0.75,1,1.25")
    predict.add_argument("--precision", choices=["auto", "32", "bf16", "16", "int8"], default="auto",
                         help="auto (default: int8 on a CPU with VNNI or AMX for a checkpoint whose stored int8 "
                              "ranges scored within 0.2 points of float32, unless the CPU has AMX or the network is "
                              "mostly not convolutions and bf16 is native; else bf16 where the hardware runs it "
                              "natively; else 32), 32, bf16, 16 (CUDA), int8 (8-bit products, CPUs with VNNI or AMX)")
    predict.add_argument("--calibration", nargs="+", metavar="PATH",
                         help="--precision int8: images (files or folders) its scales come from "
                              "(default: the ranges the checkpoint stores, else the first of the images to predict)")
    predict.add_argument("--calibration-images", type=_positive_int,
                         help=f"--precision int8: how many calibration images (default {INT8_CALIBRATION_IMAGES})")
    predict.add_argument("--direct-convolutions", action="store_true", help=DIRECT_CONVOLUTIONS_HELP)
    predict.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True,
                         help="also write <stem>_overlay.png, the image with the mask (or each instance) blended in "
                              "(default: on; --no-overlays writes the masks only, about 30 ms less per 512 x 512 image)")
    predict.add_argument("--score-threshold", type=_unit_interval,
                         help="instance and keypoint models: detections at or above this score go into the instance "
                              "maps (or <stem>_keypoints.json) and overlays (default 0.5; results.json keeps every score)")
    predict.add_argument("--nproc", type=_positive_int, help="processes, each predicting a shard of the images")
    predict.add_argument("--crf", action="store_true", help="refine predictions with a dense CRF (docs/crf.md)")
    predict.add_argument("--crf-params", help="dense CRF parameters, e.g. theta_alpha=60,w1=5 (implies --crf)")
    predict.set_defaults(run=_predict)

    export = commands.add_parser("export", help="export a checkpoint to ONNX or TorchScript (instance and keypoint models: ONNX)")
    export.add_argument("--checkpoint", required=True, help="run directory or .safetensors checkpoint")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    export.add_argument("--out", help="output file, or a folder for <checkpoint name>.onnx or .pt in it (default: that name here)")
    export.add_argument("--image-size", type=_image_size, help="example input size (default: the training size)")
    export.add_argument("--static", action="store_true", help="fix batch, height and width to the example input")
    export.add_argument("--legacy-onnx", action="store_true", help="use the TorchScript-based ONNX exporter (faster)")
    export.set_defaults(run=_export)

    models = commands.add_parser("models", help="list the registered models")
    models.add_argument("--task", choices=["semantic", "instance", "keypoint", "image2image"], help="only this task")
    models.set_defaults(run=_models)

    bench = commands.add_parser("bench", help="throughput benchmarks, side by side with smp and torchvision")
    bench.add_argument("--models", type=lambda t: t.split(","), help="architectures, e.g. unet-r34,fpn-r34 (default: all 8)")
    bench.add_argument("--size", type=_positive_int, help="image side in pixels (default 512)")
    bench.add_argument("--batch", dest="batches", type=_int_list, help="inference batch sizes (default 1,8)")
    bench.add_argument("--train-batch", type=_positive_int, help="training batch size (default 8)")
    bench.add_argument("--repeats", type=_positive_int, help="timed runs per figure; the median is reported (default 5)")
    bench.add_argument("--warmup", type=int, help="untimed runs before timing (default 2)")
    bench.add_argument("--settle-rounds", type=int, help="up to this many more untimed runs while a call still spends "
                       "over 10%% of its time in the kernel, faulting in fresh memory (default 3)")
    bench.add_argument("--precision", choices=["auto", "32", "bf16", "16"], help="fast path precision (default auto)")
    bench.add_argument("--device", dest="devices", type=lambda t: t.split(","), default=["auto"],
                       help="cpu, cuda or cpu,cuda (default: cpu, plus cuda when present)")
    bench.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--no-peers", dest="peers", action="store_false", default=None, help="skip smp / torchvision")
    bench.add_argument("--no-train", dest="train", action="store_false", default=None, help="skip training throughput")
    bench.add_argument("--ablation", type=lambda t: t.split(","), help="architectures that get one-optimisation-at-a-time rows")
    bench.add_argument("--compile", action="store_true", default=None, help="add a torch.compile row to the ablation")
    bench.add_argument("--int8", action=argparse.BooleanOptionalAction, default=None,
                       help="time int8 too: calibrated inference, and training with int8 products (default: on CPUs "
                            "with VNNI or AMX 8-bit products)")
    bench.add_argument("--accuracy", action="store_true", default=None,
                       help="train the first model on synthetic shapes; compare fast path and fp32 mIoU")
    bench.add_argument("--accuracy-epochs", type=_positive_int,
                       help="epochs of each --accuracy training run, 24 steps each (default 6)")
    bench.add_argument("--out", default="bench-results", help="folder for bench.json and bench.md (default: bench-results)")
    bench.set_defaults(run=_bench)

    data = commands.add_parser("data", help="data set tools: `seglab data check PATH`")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = data_commands.add_parser("check", help="read every file of a data set and report each problem (exit 1 if any)")
    check.add_argument("path", help="data set folder (or a COCO JSON file)")
    check.add_argument("--format", help="folder, voc, camvid, cityscapes, ade20k, coco or instance (an instance "
                                        "folder: images/, masks/ of instance numbers, classes/; default: detected)")
    check.add_argument("--json", help="also write the report to this JSON file")
    check.set_defaults(run=_data_check)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    """A warning as the program's users read it: one line, without the source line that raised it."""
    return f"seglab: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # run as the `seglab` program: the process is seglab's own
        from seglab.interrupts import handle_interrupts
        from seglab.memory import keep_freed_memory

        keep_freed_memory()
        handle_interrupts()
        warnings.formatwarning = _one_line_warning
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    console = Console(stderr=True)
    try:
        return args.run(args, console)
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except (CommandError, ValueError, FileNotFoundError, KeyError, FloatingPointError, OSError) as error:
        if os.environ.get("SEGLAB_DEBUG"):
            raise
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        print(f"seglab: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
