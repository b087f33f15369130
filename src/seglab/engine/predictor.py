"""Inference with a trained checkpoint: probabilities and masks for images, files or folders.

Options a :class:`Predictor` applies to every image:
- `tile` (with `overlap`, `tile_batch`): sliding-window inference for images larger than the
  tile (seglab.engine.sliding), memory bounded by the tile batch;
- `tta_flips` ("h", "v") and `tta_scales`: test-time augmentation, every view's probabilities
  mapped back to the image and averaged (in probability space, not logits);
- `precision`: "32", "bf16" ("16" on CUDA), "auto" (bf16 where the hardware runs it natively;
  on a CPU without it but with int8 products, int8 for a checkpoint whose stored int8 ranges
  scored within 0.2 points of float32, seglab.engine.int8_checkpoint, else float32; with
  AVX-512 BF16 but no AMX, that record makes it int8 for networks whose FLOPs are mostly in
  convolutions, `auto_inference_precision`); "int8"
  (the convolutions' products in 8 bits, scales from `calibration` images, or else the
  checkpoint's stored ranges; CPUs with VNNI or AMX, seglab.engine.int8);
- `config_source`: how errors about `config` name it (`from_checkpoint`: the checkpoint's JSON);
- `optimize`: seglab.engine.fastpath's inference path (conv-BN folding, channels_last, the
  whole model in the chosen precision), on by default for checkpoints.

`predict_files` writes a palette mask and an overlay per image; in a multi-process job
(torchrun or `seglab predict --nproc N`) each rank takes a disjoint shard of the files.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from seglab.crf import make_crf
from seglab.data.io import image_batch, list_images, read_image
from seglab.engine.checkpoint import load_checkpoint, resolve_checkpoint
from seglab.engine.distributed import env_rank, shard
from seglab.engine.evaluator import Normalize, logits_of
from seglab.engine.fastpath import optimize_for_inference
from seglab.engine.int8_checkpoint import auto_inference_precision, stored_int8
from seglab.engine.precision import resolve_precision
from seglab.engine.sliding import sliding_window
from seglab.engine.trainer import resolve_device
from seglab.files import PICTURE_COMPRESS_LEVEL, atomic_write_png, output_folder
from seglab.interrupts import raise_if_interrupted
from seglab.ops.class_map import class_indices
from seglab.viz import overlay, palette_image

__all__ = ["Predictor", "equal_size_runs", "output_stems"]

ImageLike = torch.Tensor | np.ndarray | Image.Image | str | Path  # a path: the file, read as the folders are
FLIP_DIMS = {"h": (-1,), "v": (-2,)}


def output_stems(files: Sequence[Path]) -> list[str]:
    """One output name per input file, unique even when two folders hold the same file name."""
    counts = Counter(path.stem for path in files)
    stems, taken = [], set()
    for path in files:
        stem = path.stem if counts[path.stem] == 1 else f"{path.parent.name}_{path.stem}"
        candidate, number = stem, 1
        while candidate in taken:
            number += 1
            candidate = f"{stem}_{number}"
        taken.add(candidate)
        stems.append(candidate)
    return stems


def equal_size_runs(
    jobs: Sequence[tuple[Any, ...]], channels: int, batch_size: int, unreadable: list[tuple[Path, str]] | None = None,
) -> Iterator[list[tuple[Any, ...]]]:
    """The images of `jobs` (tuples whose first item is an image file) read in order, as runs of
    consecutive equal-size images, up to `batch_size` a run; each job comes back as
    `(*job, image)`. A file that cannot be read raises, or with `unreadable` (a list) is left
    out and `(file, one-line reason)` appended, so one bad file among thousands loses no work."""
    pending: list[tuple[Any, ...]] = []
    for job in jobs:
        raise_if_interrupted()
        try:
            image = read_image(job[0], channels=channels)
        except (ValueError, FileNotFoundError) as error:
            if unreadable is None:
                raise
            unreadable.append((Path(job[0]), str(error)))
            continue
        if pending and (len(pending) == batch_size or pending[0][-1].shape != image.shape):
            yield pending
            pending = []
        pending.append((*job, image))
    if pending:
        yield pending


# Above this many pixels an image predicted whole (no --tile) gets a warning: the activations of
# the whole image are held at once (CamVid's U-Net-R18 in int8: 5.9 GB for 12 megapixels).
WHOLE_IMAGE_PIXELS = 4_000_000


class Predictor:
    """Wraps a semantic segmentation model with its normalisation, classes and palette."""

    def __init__(
        self,
        model: nn.Module,
        config: dict[str, Any],
        device: str | torch.device = "auto",
        *,
        tile: int | tuple[int, int] | None = None,
        overlap: float = 0.25,
        tile_batch: int = 4,
        tta_flips: Sequence[str] = (),
        tta_scales: Sequence[float] = (1.0,),
        precision: str = "32",
        batch_size: int = 4,
        optimize: bool = False,
        winograd: bool = True,
        crf: dict[str, float | int] | None = None,
        calibration: Sequence[ImageLike] | None = None,
        config_source: str = "the checkpoint config",
    ) -> None:
        self.device = resolve_device(str(device), env_rank().local_rank) if not isinstance(device, torch.device) else device
        self.config = config
        self.classes: list[str] = list(config.get("classes", []))
        self.palette: list[list[int]] = config.get("palette", [])
        self.in_channels = int(config.get("kwargs", {}).get("in_channels", 3))
        self.normalize = Normalize(config.get("mean", [0.5] * 3), config.get("std", [0.5] * 3)).to(self.device)
        chosen = str(precision) == "auto"
        # int8 input ranges the checkpoint carries (seglab.engine.int8_checkpoint): read where used
        used = chosen or str(precision) == "int8"
        self.int8_record = stored_int8(config, config_source, lenient=chosen) if used else None
        if chosen:  # the fast path's choice (bf16 where native), or int8 where the checkpoint's record allows
            precision = auto_inference_precision(self.device, self.int8_record if optimize else None, model)
        int8 = str(precision) == "int8"
        if int8 and not optimize:
            raise ValueError("precision int8 is a step of the fast inference path; it needs optimize=True")
        if int8 and calibration is None and self.int8_record is None:
            raise ValueError("precision int8 needs calibration images: this checkpoint stores no int8 ranges")
        self.precision = str(precision)
        self.int8_ranges_used = False  # int8 with the checkpoint's ranges (not calibrated here)
        autocast = contextlib.nullcontext if int8 else resolve_precision(precision, self.device).autocast
        self.model = model.to(self.device).eval()
        if optimize:  # the fast path casts the model itself, so no autocast on top
            batches = None if calibration is None else [self.normalize(self._as_batch(image)) for image in calibration]
            ranges = self.int8_record.ranges if int8 and batches is None else None
            self.int8_ranges_used = ranges is not None
            try:
                self.model = optimize_for_inference(self.model, precision=precision, winograd=winograd,
                                                    calibration=batches, int8_ranges=ranges)
            except ValueError as error:
                if not (chosen and int8):
                    raise
                # ranges from another version of the fast path, named differently: auto falls back
                warnings.warn(f"--precision auto: the checkpoint's int8 ranges do not fit this model ({error}); "
                              "running float32", RuntimeWarning, stacklevel=2)
                self.precision, self.int8_ranges_used = "32", False
                self.model = optimize_for_inference(self.model, precision="32", winograd=winograd)
            autocast = contextlib.nullcontext
        self.autocast = autocast
        unknown = sorted(set(tta_flips) - set(FLIP_DIMS))
        if unknown:
            raise ValueError(f"--tta-flips takes h (horizontal) and v (vertical), not {', '.join(unknown)}")
        if not tta_scales or any(not scale > 0 for scale in tta_scales):
            raise ValueError(f"--tta-scales must be positive numbers, not {list(tta_scales)}")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be a positive number, not {batch_size}")
        self.tile, self.overlap, self.tile_batch = tile, overlap, tile_batch
        self.views = [(float(scale), flip) for scale in tta_scales for flip in (None, *tta_flips)]
        self.batch_size = batch_size
        self.crf = None if crf is None else make_crf(crf)  # dense CRF on the averaged probabilities (seglab.crf)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", optimize: bool = True, **options: Any) -> "Predictor":
        """Load a checkpoint (run directory, .safetensors or .json); `options` as in the constructor."""
        model, config = load_checkpoint(path)
        if config.get("task", "semantic") != "semantic":
            raise ValueError(f"checkpoint {path} is for task {config.get('task')!r}; this predictor is for semantic models")
        return cls(model, config, device, optimize=optimize, config_source=f"{resolve_checkpoint(path)}.json", **options)

    def _as_batch(self, image: ImageLike) -> torch.Tensor:
        """`image` as a float32 batch in [0, 1] on the device (seglab.data.io.image_batch)."""
        return image_batch(image, self.in_channels).to(self.device)

    def _model_probabilities(self, normalized: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = logits_of(self.model(normalized))
        return logits.float().softmax(dim=1)

    def _view_probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """One view, whole-image or tiled when the image is larger than the tile."""
        normalized = self.normalize(batch)
        tile = self.tile
        if tile is not None:
            tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
            if batch.shape[-2] > tile_h or batch.shape[-1] > tile_w:
                return sliding_window(self._model_probabilities, normalized, (tile_h, tile_w), self.overlap, self.tile_batch)
        return self._model_probabilities(normalized)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """N x K x H x W class probabilities of an N x C x H x W batch in [0, 1], over all TTA views."""
        size = batch.shape[-2:]
        total: torch.Tensor | None = None
        for scale, flip in self.views:
            view = batch if scale == 1.0 else F.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
            if flip is not None:
                view = view.flip(FLIP_DIMS[flip])
            probabilities = self._view_probabilities(view)
            if flip is not None:
                probabilities = probabilities.flip(FLIP_DIMS[flip])
            if probabilities.shape[-2:] != size:
                probabilities = F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False)
            total = probabilities if total is None else total.add_(probabilities)
        assert total is not None
        total = total.div_(len(self.views))
        return total if self.crf is None else self.crf(batch, total)

    def predict_proba(self, image: ImageLike) -> torch.Tensor:
        """Class probabilities, K x H x W (or N x K x H x W for a batch)."""
        probabilities = self.probabilities(self._as_batch(image))
        batched = isinstance(image, torch.Tensor) and image.dim() == 4
        return probabilities if batched else probabilities[0]

    def predict(self, image: ImageLike) -> torch.Tensor:
        """Class index per pixel, H x W (or N x H x W), int64 on the CPU."""
        probabilities = self.predict_proba(image)
        return class_indices(probabilities, dim=-3).cpu()

    def predict_files(
        self,
        paths: Sequence[str | Path],
        out_dir: str | Path,
        progress: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        overlays: bool = True,
        unreadable: list[tuple[Path, str]] | None = None,
    ) -> list[Path]:
        """For each image: `<stem>_mask.png` (palette PNG of class indices) and, with `overlays`,
        `<stem>_overlay.png` (the image with the mask blended in: about 30 ms more per 512 x 512
        camera image on a 2-core Zen 4, half of it the PNG compression; 100 ms at zlib's default level).

        A file that cannot be read raises; with `unreadable` (a list) it is skipped and
        `(file, reason)` appended, and the other images are still predicted.

        `rank` of `world_size` processes (default: from torchrun's environment) predicts only
        its shard of the files; output names are chosen from the full list, so shards never
        write the same file.
        """
        files = list_images(list(paths))
        if not files:
            raise ValueError("no images to predict: the given folders hold no image files")
        if rank is None or world_size is None:
            context = env_rank()
            rank, world_size = context.rank, context.world_size
        jobs = shard(list(zip(files, output_stems(files))), rank, world_size)
        out_dir = output_folder(out_dir)
        written: list[Path] = []
        task = progress.add_task("predict", total=len(jobs), info="") if progress is not None else None
        warned_of_size = False
        for batch in equal_size_runs(jobs, self.in_channels, self.batch_size, unreadable):
            height, width = batch[0][2].shape[-2:]
            if self.tile is None and height * width > WHOLE_IMAGE_PIXELS and not warned_of_size:
                warned_of_size = True
                warnings.warn(f"{batch[0][0].name} is {width} x {height} pixels, predicted whole: memory grows with the "
                              f"pixels (a 12-megapixel image took about 6 GB); --tile 1024 predicts in windows")
            masks = class_indices(self.probabilities(torch.stack([image for _, _, image in batch]).to(self.device))).cpu()
            for (path, stem, image), mask in zip(batch, masks):
                mask_path = out_dir / f"{stem}_mask.png"
                atomic_write_png(mask_path, palette_image(mask, self.palette))
                written.append(mask_path)
                if overlays:
                    overlay_path = out_dir / f"{stem}_overlay.png"
                    blended = overlay(image, mask, self.palette)
                    atomic_write_png(overlay_path, blended, compress_level=PICTURE_COMPRESS_LEVEL)
                    written.append(overlay_path)
                if task is not None:
                    progress.update(task, advance=1, info=path.name)
        if task is not None and unreadable:
            progress.update(task, completed=len(jobs))  # skipped files count as done
        return written
