"""Inference with a trained instance checkpoint (Mask R-CNN, YOLACT): detections for images,
files or folders.

:class:`InstancePredictor` runs the model on the fast inference path (conv-BN folding, fused
activations, Winograd's 3x3 convolutions, channels_last) in the chosen precision ("auto":
:func:`auto_instance_precision`). :meth:`~InstancePredictor.predict` gives one
image's detections at or above `score_threshold`, highest score first.

:meth:`~InstancePredictor.predict_files` writes, per image, the two PNGs that an instance folder
data set reads (:class:`seglab.data.instance.InstanceFolder`), so predictions can be inspected,
corrected and trained on:

- ``<stem>_instances.png``: 16-bit, 0 background, k the k-th detection (highest score first);
  where two masks overlap, the higher score keeps the pixel;
- ``<stem>_classes.png``: each pixel's class index, 0 background;
- with `overlays`, ``<stem>_overlay.png``: one colour per instance, boxes labelled "class score";

and for the whole job ``results.json`` (COCO results records: every detection, every score, as
COCO mask AP needs them; category ids those of the COCO file the checkpoint was trained on, else
the labels 1..K) with ``images.json`` (image id -> file). In a multi-process job
(torchrun or `seglab predict --nproc N`) each rank predicts its shard of the files and rank 0
writes the two JSON files with every rank's records.
"""
from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import Progress
from torch import nn

from seglab.data.io import image_batch, list_images
from seglab.engine.checkpoint import load_checkpoint
from seglab.engine.distributed import env_rank, init_distributed, shard, shutdown_distributed
from seglab.engine.fastpath import optimize_instance_model
from seglab.engine.precision import auto_precision, resolve_precision
from seglab.engine.predictor import ImageLike, equal_size_runs, output_stems
from seglab.engine.trainer import progress_bar, resolve_device
from seglab.files import PICTURE_COMPRESS_LEVEL, atomic_write_png, atomic_write_text, output_folder
from seglab.metrics import save_coco_results
from seglab.metrics.coco import coco_results
from seglab.viz import to_uint8_image

__all__ = ["InstancePredictor", "auto_instance_precision", "class_name", "instance_maps", "instance_overlay", "label_box",
           "predict_instance", "sorted_detections"]

SCORE_THRESHOLD = 0.5  # the detections drawn and mapped by default (results.json keeps every score)
MASK_THRESHOLD = 0.5  # a pixel whose mask probability is above it is the object's (as coco_results reads masks)


def sorted_detections(prediction: dict[str, torch.Tensor], score_threshold: float = 0.0) -> dict[str, torch.Tensor]:
    """One image's detections on the CPU at or above `score_threshold`, highest score first;
    masks as N x H x W booleans, floating-point fields in float32 (under bf16 autocast they may
    come out in bfloat16, which NumPy and pycocotools cannot read)."""
    fields = {k: (v.float() if v.is_floating_point() and k != "masks" else v).cpu() for k, v in prediction.items()}
    if "masks" in fields:  # booleans before any reordering: a quarter of the bytes to move
        masks = fields["masks"]
        masks = masks[:, 0] if masks.dim() == 4 else masks
        fields["masks"] = masks > MASK_THRESHOLD if masks.is_floating_point() else masks.bool()
    count = len(fields["scores"])
    order = torch.argsort(fields["scores"], descending=True, stable=True)
    order = order[fields["scores"][order] >= score_threshold]
    # Models return their detections sorted already; then the kept ones are a leading slice,
    # a view, where a gather would copy 100 masks of a 512-pixel image for nothing.
    pick: torch.Tensor | slice = slice(0, len(order)) if torch.equal(order, torch.arange(len(order))) else order
    return {k: v[pick] if v.dim() > 0 and len(v) == count else v for k, v in fields.items()}


def instance_maps(detections: dict[str, torch.Tensor], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The instance-index map (uint16: 0 background, k the k-th of `detections`) and the class
    map (uint8 labels, 0 background) of detections sorted highest score first; where masks
    overlap, the earlier (higher-scoring) detection keeps the pixel."""
    masks = detections["masks"]
    if len(masks) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(masks)} detections do not fit a 16-bit instance map")
    labels = detections["labels"]
    if len(labels) and int(labels.max()) > np.iinfo(np.uint8).max:
        raise ValueError(f"class {int(labels.max())} does not fit an 8-bit class map")
    instances = np.zeros(size, np.uint16)
    classes = np.zeros(size, np.uint8)
    # painted lowest score first, so that each higher-scoring mask paints over it
    for number in range(len(masks), 0, -1):
        pixels = masks[number - 1].numpy()
        instances[pixels] = number
        classes[pixels] = int(labels[number - 1])
    return instances, classes


def instance_overlay(image: torch.Tensor, prediction: dict[str, torch.Tensor], classes: Sequence[str],
                     score_threshold: float = 0.5, alpha: float = 0.5) -> np.ndarray:
    """Each instance in its own colour, outlined by its box and labelled "class score"."""
    detections = sorted_detections(prediction, score_threshold)
    picture = to_uint8_image(image).astype(np.float32)
    colours = [_distinct_colour(i) for i in range(len(detections["scores"]))]
    for mask, colour in zip(detections["masks"].numpy(), colours):
        picture[mask] = (1 - alpha) * picture[mask] + alpha * np.asarray(colour, np.float32)
    canvas = Image.fromarray(picture.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for box, label, score, colour in zip(detections["boxes"].tolist(), detections["labels"].tolist(),
                                         detections["scores"].tolist(), colours):
        label_box(draw, box, f"{class_name(classes, label)} {score:.2f}", colour)
    return np.asarray(canvas)


def class_name(classes: Sequence[str], label: int) -> str:
    """A detection's class name, or its label as text where the checkpoint names no such class."""
    return classes[label] if 0 <= label < len(classes) else str(label)


def label_box(draw: ImageDraw.ImageDraw, box: Sequence[float], text: str, colour: tuple[int, int, int]) -> None:
    """A detection's box outlined in its colour, `text` inside its top-left corner."""
    draw.rectangle(list(box), outline=colour)
    draw.text((box[0] + 1, box[1] + 1), text, fill=colour)


def _distinct_colour(index: int) -> tuple[int, int, int]:
    """Well-separated hues by the golden-angle walk, bright and saturated."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def auto_instance_precision(device: torch.device) -> str:
    """What "auto" runs an instance model in: the device's native precision
    (`seglab.engine.precision.auto_precision`: bf16 on AVX-512 BF16 / AMX CPUs), as semantic
    models. Under bf16 the fast path keeps to conv-BN folding and channels_last
    (:func:`~seglab.engine.fastpath.optimize_instance_model`); on a 2-core Zen 4 that took
    0.72x (YOLACT), 0.67x (Mask R-CNN) and 0.85x (Keypoint R-CNN) of float32's full fast path's
    CPU time at 512 pixels, 0.82x and 0.74x (YOLACT, Mask R-CNN) at 128 (ResNet-50, 20
    detections). Until 2026-12-07 the bf16 path also kept float32's fused, prepacked and Winograd
    convolutions, which made bf16 1.4-1.55x slower than float32, and "auto" chose float32."""
    return auto_precision(device)


class InstancePredictor:
    """Wraps an instance segmentation model (a list of C x H x W images in [0, 1] in, one
    detections dict per image out) with its classes, precision and score threshold.

    The files written per image and the COCO records are the task's (``_image_files``,
    ``_overlay``, ``records_of``): :class:`seglab.engine.keypoints.KeypointPredictor` writes
    keypoints instead.
    """

    task = "instance"
    files_words = "instance and class maps"  # what predict_files writes per image, for the closing line
    counted_suffix = "_instances.png"  # the one file per image predicted
    records_of = staticmethod(coco_results)  # the COCO results records of detections and image ids

    def __init__(
        self,
        model: nn.Module,
        config: dict[str, Any],
        device: str | torch.device = "auto",
        *,
        precision: str = "auto",
        score_threshold: float = SCORE_THRESHOLD,
        batch_size: int = 1,
        optimize: bool = True,
        winograd: bool = True,
    ) -> None:
        if str(precision) == "int8":
            raise ValueError("precision int8 is for semantic models; an instance model runs auto, 32, bf16 or 16")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"--score-threshold must lie in [0, 1], not {score_threshold}")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be a positive number, not {batch_size}")
        self.device = resolve_device(str(device), env_rank().local_rank) if not isinstance(device, torch.device) else device
        self.config = config
        self.classes: list[str] = list(config.get("classes", []))
        self.in_channels = int(config.get("kwargs", {}).get("in_channels", 3))
        self.score_threshold = float(score_threshold)
        self.batch_size = batch_size
        if str(precision).lower() == "auto":
            precision = auto_instance_precision(self.device)
        resolved = resolve_precision(str(precision), self.device)
        self.precision = resolved.name
        self.autocast: Callable[[], ContextManager] = resolved.autocast
        self.model = model.to(self.device).eval()
        if optimize:  # float32 steps of the fast path; the precision comes from autocast
            self.model = optimize_instance_model(self.model, winograd=winograd, precision=self.precision)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", **options: Any) -> "InstancePredictor":
        """Load a checkpoint (run directory, .safetensors or .json); `options` as in the constructor."""
        model, config = load_checkpoint(path)
        if config.get("task") != cls.task:
            raise ValueError(f"checkpoint {path} is for task {config.get('task', 'semantic')!r}; this predictor is for "
                             f"{cls.task} models (seglab.engine.predictor.Predictor takes semantic ones, InstancePredictor "
                             "instance ones, seglab.engine.keypoints.KeypointPredictor keypoint ones)")
        return cls(model, config, device, **options)

    @torch.inference_mode()
    def detect(self, images: Sequence[torch.Tensor], score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections of C x H x W float images in [0, 1], one forward pass, on the CPU, sorted
        highest score first, at or above `score_threshold` (default: the predictor's)."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        with self.autocast():
            predictions = self.model([image.to(self.device) for image in images])
        return [sorted_detections(prediction, threshold) for prediction in predictions]

    def predict(self, image: ImageLike) -> dict[str, torch.Tensor]:
        """One image's detections at or above the score threshold, highest score first: boxes
        (XYXY pixels), labels (1..K), scores and masks (N x H x W booleans), on the CPU."""
        batch = image_batch(image, self.in_channels)
        if len(batch) != 1:
            raise ValueError(f"predict takes one image, not a batch of {len(batch)}")
        return self.detect([batch[0]])[0]

    def _in_file_categories(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Records whose category ids are the training COCO file's (which a checkpoint trained on
        one keeps as "category_ids", the id of each label 1..K); labels as they are otherwise."""
        category_ids = self.config.get("category_ids")
        if not category_ids:
            return records
        return [{**record, "category_id": category_ids[record["category_id"] - 1]} for record in records]

    def _image_files(self, out_dir: Path, stem: str, image: torch.Tensor, found: dict[str, torch.Tensor]) -> list[Path]:
        """The instance and class maps of the detections at or above the score threshold."""
        shown = sorted_detections(found, self.score_threshold)
        instances, classes = instance_maps(shown, tuple(image.shape[-2:]))
        written = []
        for suffix, pixels in (("instances", instances), ("classes", classes)):
            target = out_dir / f"{stem}_{suffix}.png"
            atomic_write_png(target, pixels)
            written.append(target)
        return written

    def _overlay(self, image: torch.Tensor, found: dict[str, torch.Tensor]) -> np.ndarray:
        return instance_overlay(image, found, self.classes, self.score_threshold)

    def predict_files(
        self,
        paths: Sequence[str | Path],
        out_dir: str | Path,
        progress: Progress | None = None,
        overlays: bool = True,
        unreadable: list[tuple[Path, str]] | None = None,
    ) -> list[Path]:
        """The module docstring's files for the images in `paths` (files and folders), in
        `out_dir`; this rank's shard of them in a multi-process job. Returns the files written.

        A file that cannot be read raises; with `unreadable` (a list) it is skipped,
        `(file, reason)` appended (every rank's, on rank 0), and images.json leaves it out."""
        files = list_images(list(paths))
        if not files:
            raise ValueError("no images to predict: the given folders hold no image files")
        context = env_rank()
        jobs = shard(list(zip(files, output_stems(files), range(1, len(files) + 1))), context.rank, context.world_size)
        out_dir = output_folder(out_dir)
        written: list[Path] = []
        records: list[dict[str, Any]] = []
        task = progress.add_task("predicting", total=len(jobs), info="") if progress is not None else None
        skipped: list[tuple[Path, str]] = []
        for batch in equal_size_runs(jobs, self.in_channels, self.batch_size, None if unreadable is None else skipped):
            detections = self.detect([image for *_, image in batch], score_threshold=0.0)
            for (path, stem, image_id, image), found in zip(batch, detections):
                records += self._in_file_categories(self.records_of([found], [image_id]))
                written += self._image_files(out_dir, stem, image, found)
                if overlays:
                    target = out_dir / f"{stem}_overlay.png"
                    panel = self._overlay(image, found)
                    atomic_write_png(target, panel, compress_level=PICTURE_COMPRESS_LEVEL)
                    written.append(target)
                if progress is not None and task is not None:
                    progress.update(task, advance=1, info=path.name)
        if progress is not None and task is not None and skipped:
            progress.update(task, completed=len(jobs))  # skipped files count as done
        if context.enabled and dist.is_initialized():
            gathered: list[tuple[list[dict[str, Any]], list[tuple[Path, str]]] | None] = [None] * context.world_size
            dist.all_gather_object(gathered, (records, skipped))
            parts = [part for part in gathered if part is not None]
            records = sorted((r for part, _ in parts for r in part), key=lambda r: (r["image_id"], -r["score"]))
            skipped = [entry for _, part in parts for entry in part]
        if context.is_main:
            if unreadable is not None:
                unreadable += skipped
            written.append(save_coco_results(records, out_dir / "results.json"))
            left_out = {path for path, _ in skipped}
            index = [{"id": i, "file_name": str(p)} for i, p in enumerate(files, start=1) if p not in left_out]
            atomic_write_text(out_dir / "images.json", json.dumps(index, indent=1))
            written.append(out_dir / "images.json")
        return written


def predict_instance(args: Any, console: Console, unreadable: list[tuple[Path, str]] | None = None,
                     predictor_class: type[InstancePredictor] = InstancePredictor) -> None:
    """`seglab predict` with an instance checkpoint: the module docstring's files in --out;
    given `unreadable` (a list), images that cannot be read are skipped and listed there.
    A keypoint checkpoint passes its predictor class."""
    context = init_distributed(resolve_device(args.device).type)  # a multi-process job gathers its records
    try:
        predictor = predictor_class.from_checkpoint(
            args.checkpoint, device=args.device, precision=args.precision,
            score_threshold=SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold,
            batch_size=args.batch_size, winograd=not args.direct_convolutions)
        with progress_bar(console, disable=not context.is_main) as progress:
            written = predictor.predict_files(args.images, args.out, progress=progress, overlays=args.overlays,
                                              unreadable=unreadable)
    finally:
        shutdown_distributed()
    if context.is_main:
        images = sum(path.name.endswith(predictor.counted_suffix) for path in written)
        share = f" by rank 0 of {context.world_size} (each rank its own shard)" if context.enabled else ""
        what = predictor.files_words + (", overlays" if args.overlays else "")
        arithmetic = "float32" if predictor.precision == "32" else predictor.precision
        Console().print(f"{images} image(s) predicted{share} in {arithmetic}, score threshold "
                        f"{predictor.score_threshold:g}; {what} and results.json (COCO results, every score) "
                        f"in {os.path.normpath(args.out)}/")
