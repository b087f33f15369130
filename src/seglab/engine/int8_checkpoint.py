"""int8 input scales that travel with a checkpoint, checked against float32 where they were made.

Static int8 inference (`seglab.engine.int8`) needs each convolution's input range, measured on
calibration images. `seglab train` on a CPU that runs int8 (VNNI or AMX), in one process or
several, ends by measuring them for its best weights, on the first `CALIBRATION_IMAGES` images
of the train split as evaluation sees them (unaugmented: the images `seglab eval --precision
int8` calibrates on), and by scoring the int8 model on the validation split (each process its
shard). `seglab eval --precision int8 --store-int8-ranges` does the same for a checkpoint
trained elsewhere. The ranges and both mIoU values go into the checkpoint's JSON under "int8":

    {"ranges": {"<module>": [low, high], ...}, "images": 16,
     "miou_float32": 0.8631, "miou_int8": 0.8629}

What they buy:
- `--precision int8` needs no calibration images for such a checkpoint, and gives the same
  predictions whatever images come first;
- where the processor has no native bfloat16, `--precision auto` (`seglab predict`'s default,
  `Predictor`'s "auto") runs int8 when the checkpoint's int8 mIoU was within `AUTO_TOLERANCE`
  (the 0.2 points the fast path may cost) of its float32 mIoU: on a 2-core AVX-512 VNNI Xeon
  int8 inference ran 3.1-4.6x the peers' float32 against 1.8-2.7x for float32 (docs/bench.md).
  A checkpoint without the record, or whose int8 strayed further, runs float32 as before;
- where bfloat16 is native by AVX-512 BF16 without AMX (AMD Zen 4), the same record makes
  "auto" int8 rather than bf16 for a network whose multiply-adds are mostly in convolutions
  int8 takes (`INT8_OVER_BF16_SHARE`): VNNI's byte products do twice as many per instruction
  as bf16's pairs, and there every convolution network measured, from the quick-start U-Net
  to DeepLabV3-R50, ran int8 at 1.00-1.90x bf16's speed, while SegFormer-B0, whose linears
  stay float32 under int8 (a share of 0.12-0.21), ran 0.89-1.11x (`benchmarks/int8_over_bf16.py`,
  docs/bench.md). On AMX processors, unmeasured, bf16 stays.

The ranges are named by the modules of the fast path's model (`optimize_for_inference`), which
its int8 preparation builds the same way from the same architecture every time.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from seglab.engine.evaluator import Normalize, evaluate
from seglab.engine.fastpath import default_precision, optimize_for_inference
from seglab.engine.int8 import cpu_runs_int8, int8_input_ranges
from seglab.engine.precision import cpu_has

__all__ = ["AUTO_TOLERANCE", "CALIBRATION_IMAGES", "INT8_OVER_BF16_SHARE", "Int8Record", "auto_inference_precision",
           "calibration_images", "int8_share", "measure_int8", "stored_int8"]

CALIBRATION_IMAGES = 16
AUTO_TOLERANCE = 0.002  # mIoU as a fraction: 0.2 points
INT8_OVER_BF16_SHARE = 0.5  # of the forward's FLOPs, in convolutions int8 takes
_PROBE_SIZE = 64  # pixels a side: the zero image `int8_share` runs the network on


@dataclass
class Int8Record:
    """A checkpoint's int8 input ranges and the validation mIoU they gave against float32's."""

    ranges: dict[str, tuple[float, float]]
    images: int
    miou_float32: float
    miou_int8: float

    def within(self, tolerance: float = AUTO_TOLERANCE) -> bool:
        """True when int8 lost (or gained) at most `tolerance` of mIoU against float32."""
        return abs(self.miou_int8 - self.miou_float32) <= tolerance

    def finite(self) -> bool:
        """True when every range and both mIoU values are finite numbers (what JSON can keep)."""
        values = [value for pair in self.ranges.values() for value in pair] + [self.miou_float32, self.miou_int8]
        return all(math.isfinite(value) for value in values)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["ranges"] = {name: [low, high] for name, (low, high) in self.ranges.items()}
        return record


def stored_int8(config: dict[str, Any], source: str = "checkpoint", *, lenient: bool = False) -> Int8Record | None:
    """The "int8" record of a checkpoint's config, or None where it has none; ValueError (naming
    `source`) where it is malformed, or with `lenient` (what "auto" reads) a warning and None:
    "auto" then runs what it would without a record."""
    if lenient:
        try:
            return stored_int8(config, source)
        except ValueError as error:
            warnings.warn(f"--precision auto: {error}; passed over", RuntimeWarning, stacklevel=2)
            return None
    record = config.get("int8")
    if record is None:
        return None
    try:
        ranges = {str(name): (float(low), float(high)) for name, (low, high) in record["ranges"].items()}
        parsed = Int8Record(ranges, int(record["images"]), float(record["miou_float32"]), float(record["miou_int8"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{source}: its \"int8\" entry is not a record of ranges, images, miou_float32 and miou_int8") from None
    if not parsed.ranges or not parsed.finite():
        raise ValueError(f"{source}: its \"int8\" entry has no ranges, or values that are not finite numbers")
    return parsed


def auto_inference_precision(device: torch.device, record: Int8Record | None, model: nn.Module | None = None) -> str:
    """What "auto" runs for a checkpoint: the fast path's choice (bf16 where the hardware runs it
    natively), except on a CPU with int8 products where a record within `AUTO_TOLERANCE` makes
    it int8: always where that choice is float32; where it is bf16 without AMX, for a `model`
    with at least `INT8_OVER_BF16_SHARE` of its FLOPs in convolutions int8 takes."""
    precision = default_precision(device)
    if device.type != "cpu" or record is None or not record.within() or not cpu_runs_int8():
        return precision
    if precision == "32":
        return "int8"
    if precision == "bf16" and not cpu_has("amx_tile") and model is not None:
        share = int8_share(model)
        if share is not None and share >= INT8_OVER_BF16_SHARE:
            return "int8"
    return precision


@torch.no_grad()
def int8_share(model: nn.Module, size: int = _PROBE_SIZE) -> float | None:
    """The share of `model`'s FLOPs that int8 inference runs as byte products: its one-group
    convolutions' (a U-Net decoder step's counted on its upsampled grid, as int8 runs it)
    against those plus everything else torch.utils.flop_counter counts (linears, attention,
    grouped convolutions), from one forward of a `size` x `size` zero image in eval mode;
    None where the network has no convolution or does not run at that size."""
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        return None
    counter = FlopCounterMode(display=False)
    # what the counter saw inside the Conv2d modules (a U-Net step's transposed products too),
    # and what int8 runs: the one-group convolutions on their output grids
    inside = {"counted": 0, "started": 0, "one group": 0, "grouped": 0}

    def start(module: nn.Module, args: tuple) -> None:
        inside["started"] = counter.get_total_flops()

    def count(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inside["counted"] += counter.get_total_flops() - inside["started"]
        if isinstance(output, torch.Tensor):
            inside["one group" if module.groups == 1 else "grouped"] += 2 * output.numel() * module.weight[0].numel()

    parameter = next(model.parameters())
    image = torch.zeros(1, convolutions[0].in_channels * convolutions[0].groups, size, size,
                        device=parameter.device, dtype=parameter.dtype)
    handles = [hook for module in convolutions
               for hook in (module.register_forward_pre_hook(start), module.register_forward_hook(count))]
    training = model.training
    try:
        model.eval()
        with counter:
            model(image)
    except (RuntimeError, ValueError):  # e.g. a pooling pyramid wider than the probe's map
        return None
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    others = counter.get_total_flops() - inside["counted"] + inside["grouped"]
    total = inside["one group"] + others
    return inside["one group"] / total if total > 0 else None


def calibration_images(dataset: Any, normalize: Normalize, count: int = CALIBRATION_IMAGES,
                       device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The first `count` images of `dataset` (samples with an "image"), normalised, one batch of
    one each: what `seglab eval --precision int8` and the training run's record calibrate on."""
    return [normalize(dataset[i]["image"][None].to(device)) for i in range(min(len(dataset), count))]


@torch.no_grad()
def measure_int8(
    model: nn.Module,
    calibration: Iterable[torch.Tensor],
    val_loader: DataLoader,
    *,
    num_classes: int,
    ignore_index: int,
    normalize: Normalize,
    miou_float32: float,
) -> Int8Record | None:
    """Calibrate `model` (float32, on the CPU; left untouched) on the normalised `calibration`
    batches, score the int8 model on `val_loader` and return the record; None where no
    convolution takes int8, or a range is not finite (nothing to store)."""
    device = next(model.parameters()).device
    batches = list(calibration)
    int8_model = optimize_for_inference(model, "int8", calibration=batches)
    ranges = int8_input_ranges(int8_model.model)  # named as in the fast path's model
    if not ranges:
        return None  # nothing int8 takes
    results = evaluate(int8_model, val_loader, num_classes=num_classes, ignore_index=ignore_index,
                       normalize=normalize, device=device)
    images = sum(batch.shape[0] for batch in batches)
    record = Int8Record(ranges, images, float(miou_float32), float(results["miou"]))
    return record if record.finite() else None  # weights that overflowed: nothing to keep
