"""The `seglab` command line: train | eval | predict | models.

Every command takes `--help`. Bad input (missing files, unknown names, invalid values) ends
with one line `seglab: error: ...` and exit code 2; set SEGLAB_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from rich.console import Console

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2


class CommandError(Exception):
    """A user mistake reported as one line and exit code 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _image_size(text: str) -> int | list[int]:
    """`64` or `240x180` (width x height, as people write image sizes) -> int or [h, w]."""
    try:
        if "x" in text.lower():
            width, height = (int(part) for part in text.lower().split("x"))
            return [height, width]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be N or WIDTHxHEIGHT, not {text!r}") from None


# ----------------------------------------------------------------------------------- train
TRAIN_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--name", dict(help="run name (default: <model>-<data>); the run goes to <out>/<name>")),
    ("--out", dict(help="folder that holds the runs (default: runs)")),
    ("--task", dict(choices=["semantic", "instance"], help="semantic (default) or instance segmentation")),
    ("--model", dict(help="registered model name (see `seglab models`; default: unet)")),
    ("--encoder", dict(help="encoder/backbone name for models that take one (e.g. resnet34)")),
    ("--data", dict(help="'synthetic' (default, built in) or a data set folder")),
    ("--format", dict(help="data set layout of --data (default: detected)")),
    ("--num-classes", dict(type=_positive_int, help="classes of the synthetic set (2-6)")),
    ("--image-size", dict(type=_image_size, help="training size: N or WIDTHxHEIGHT")),
    ("--train-samples", dict(type=_positive_int, help="synthetic training images")),
    ("--val-samples", dict(type=_positive_int, help="synthetic validation images")),
    ("--epochs", dict(type=int, help="number of epochs")),
    ("--batch-size", dict(type=int, help="images per batch")),
    ("--lr", dict(type=float, help="peak learning rate")),
    ("--weight-decay", dict(type=float, help="weight decay")),
    ("--optimizer", dict(choices=["adamw", "sgd"], help="adamw (default) or sgd with momentum 0.9")),
    ("--scheduler", dict(choices=["cosine", "poly", "constant"], help="learning-rate schedule")),
    ("--loss", dict(help="loss, e.g. ce, dice, ce+dice, 0.5*ce+lovasz")),
    ("--max-minutes", dict(type=float, help="stop after the epoch that crosses this time budget")),
    ("--workers", dict(type=int, help="data loader processes")),
    ("--seed", dict(type=int, help="random seed (default 0)")),
    ("--device", dict(help="auto (default), cpu, cuda, cuda:N")),
]


def _train(args: argparse.Namespace, console: Console) -> int:
    from seglab.engine.config import TrainConfig, load_yaml

    values = load_yaml(args.config) if args.config else {}
    for flag, _ in TRAIN_OPTIONS:
        key = flag.lstrip("-").replace("-", "_")
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    config = TrainConfig.from_dict(values, source=str(args.config or "options"))
    if config.task != "semantic":
        raise CommandError(f"--task {config.task} is not available in this version")
    from seglab.engine.trainer import Trainer

    summary = Trainer(config, console=console).fit()
    out = Console()
    out.print(f"Best validation mIoU {summary['miou']:.4f} (epoch {summary['best_epoch']}), pixel accuracy {summary['pixel_accuracy']:.4f}, {summary['seconds']:.0f} s")
    out.print(f"Results in {summary['run_dir']}/  (best.safetensors, metrics.jsonl, curves.png, overlays/)")
    return 0


# ------------------------------------------------------------------------------------ eval
def _eval(args: argparse.Namespace, console: Console) -> int:
    from torch.utils.data import DataLoader

    from seglab.data import open_dataset
    from seglab.engine.checkpoint import load_checkpoint
    from seglab.engine.evaluator import Normalize, evaluate
    from seglab.engine.report import metrics_table
    from seglab.engine.trainer import resolve_device
    from seglab.files import atomic_write_json

    model, config = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    # By default, the data set (and options) the model was trained on.
    data = dict(config.get("data", {"source": "synthetic"}))
    source = data.pop("source")
    if args.data and args.data != source:
        source, data = args.data, ({} if args.data == "synthetic" else {"format": args.format})
    if args.image_size is not None:
        data["image_size"] = args.image_size
    dataset = open_dataset(source, args.split, **data)
    loader = DataLoader(dataset, batch_size=args.batch_size)
    results = evaluate(
        model.to(device), loader, num_classes=len(config["classes"]), ignore_index=config.get("ignore_index", 255),
        normalize=Normalize(config["mean"], config["std"]), device=device,
    )
    Console().print(metrics_table(results, config["classes"], title=f"{args.split} split of {source} ({len(dataset)} images)"))
    if args.json:
        atomic_write_json(args.json, {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in results.items()})
        console.print(f"metrics written to {args.json}")
    return 0


# --------------------------------------------------------------------------------- predict
def _predict(args: argparse.Namespace, console: Console) -> int:
    from seglab.engine.predictor import Predictor
    from seglab.engine.trainer import progress_bar

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    with progress_bar(console) as progress:
        written = predictor.predict_files(args.images, args.out, progress=progress)
    Console().print(f"{len(written) // 2} image(s) predicted; masks and overlays in {args.out}/")
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


# ---------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seglab", description="Image segmentation: train, evaluate, predict.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a model (default: U-Net on the built-in synthetic shapes)")
    train.add_argument("--config", help="YAML file of training options (the command line wins)")
    for flag, options in TRAIN_OPTIONS:
        train.add_argument(flag, **options)
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
    evaluate.set_defaults(run=_eval)

    predict = commands.add_parser("predict", help="predict masks for images or folders of images")
    predict.add_argument("--checkpoint", required=True, help="run directory or .safetensors checkpoint")
    predict.add_argument("images", nargs="+", help="image files or folders")
    predict.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(run=_predict)

    models = commands.add_parser("models", help="list the registered models")
    models.add_argument("--task", choices=["semantic", "instance", "image2image"], help="only this task")
    models.set_defaults(run=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
