"""Throughput benchmarks, side by side with the peer libraries, in one run on this machine.

For each architecture: inference images/s (eval mode) at the asked batch sizes and training
images/s (forward, backward, optimizer step), for seglab's fast path, seglab used plainly
(eval, no_grad, float32) and the same architecture from segmentation_models_pytorch or
torchvision used the way their READMEs show (eval, no_grad, float32; random init, nothing is
downloaded). Every figure is the median of `repeats` timed runs after `warmup` untimed ones.

A calibration kernel (a large 3x3 convolution in channels_last, float32 and bfloat16) measures
what the machine reaches in the same run; each model's achieved GFLOP/s (FLOPs counted by
torch.utils.flop_counter, 2 per multiply-add) is reported as a fraction of it. Ablation rows
switch on one optimisation at a time. An optional accuracy check trains a small model on the
synthetic shapes and compares the fast path's predictions and mIoU with float32.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from seglab.bench_accuracy import ACCURACY_EPOCHS, accuracy_check
from seglab.engine.attention import training_attention
from seglab.engine.fastpath import (
    autocast_context,
    default_precision,
    optimize_for_inference,
    optimizer_options,
    to_channels_last,
    training_convolutions,
    training_norms,
)
from seglab.engine.int8 import cpu_runs_int8
from seglab.engine.int8_checkpoint import INT8_OVER_BF16_SHARE
from seglab.engine.mix_ffn import training_mix_ffn
from seglab.engine.precision import cpu_has, cpu_runs_bf16, cpu_supports_bf16
from seglab.losses.pixelwise import CrossEntropyLoss, pixel_cross_entropy
from seglab.memory import keeps_freed_memory
from seglab.models.registry import create_model
from seglab.ops import native
from seglab.ops.upsample import native_score_upsampling

__all__ = ["ARCHITECTURES", "Architecture", "BenchSettings", "run_bench", "to_markdown", "machine_description"]


@dataclass(frozen=True)
class Architecture:
    """One architecture as seglab builds it and, where one exists, as a peer library does."""

    key: str
    title: str
    seglab_model: str
    seglab_kwargs: dict[str, Any]
    peer: str | None = None  # "smp" or "torchvision"
    peer_builder: Callable[[int], nn.Module] | None = None


def _smp(class_name: str, encoder: str, **settings: Any) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, class_name)(encoder, encoder_weights=None, classes=num_classes, **settings)

    return build


def _torchvision(function_name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from torchvision.models import segmentation

        return getattr(segmentation, function_name)(weights=None, weights_backbone=None, num_classes=num_classes)

    return build


# PSPNet has no auxiliary head here because neither peer computes one in training. smp's
# PSPNet by default is a light variant (the encoder cut after its stride-8 stage, no dilation);
# "pspnet-r34-os8" sets smp to the paper's encoder (all five stages, dilated to output stride 8),
# which leaves one difference: smp fuses the pyramid with a 1x1 convolution where the paper
# (and seglab) use a 3x3, so seglab's network has 1.18x the FLOPs of that peer.
ARCHITECTURES: dict[str, Architecture] = {
    a.key: a
    for a in (
        Architecture("unet-r34", "UNet-R34", "unet", {"encoder": "resnet34"}, "smp", _smp("Unet", "resnet34")),
        Architecture("fpn-r34", "FPN-R34", "fpn", {"encoder": "resnet34"}, "smp", _smp("FPN", "resnet34")),
        Architecture("pspnet-r34", "PSPNet-R34", "pspnet", {"encoder": "resnet34", "aux": False}, "smp",
                     _smp("PSPNet", "resnet34")),
        Architecture("pspnet-r34-os8", "PSPNet-R34 (smp at OS 8)", "pspnet", {"encoder": "resnet34", "aux": False},
                     "smp", _smp("PSPNet", "resnet34", encoder_depth=5, output_stride=8)),
        Architecture("deeplabv3plus-r34", "DeepLabV3+-R34", "deeplabv3plus", {"encoder": "resnet34"}, "smp",
                     _smp("DeepLabV3Plus", "resnet34")),
        Architecture("segformer-b0", "SegFormer-B0", "segformer", {"variant": "b0"}, "smp", _smp("Segformer", "mit_b0")),
        Architecture("fcn-r50", "FCN-R50", "fcn8s", {"encoder": "resnet50"}, "torchvision", _torchvision("fcn_resnet50")),
        Architecture("deeplabv3-r50", "DeepLabV3-R50", "deeplabv3", {"encoder": "resnet50", "output_stride": 8},
                     "torchvision", _torchvision("deeplabv3_resnet50")),
    )
}

# One optimisation at a time on top of plain float32 eager inference (all run under no_grad).
INT8_VARIANT = "int8 (calibrated)"
# the float32 training route with the large 1x1 convolutions' (and the ASPP's atrous windows')
# forward and input gradient as int8 products (`seglab.ops.int8_products`), on CPUs that run int8
INT8_TRAINING_VARIANT = "int8 products"
INT8_CALIBRATION_BATCHES = 2
_NOTHING = dict(precision="32", fold_bn=False, fuse_relu=False, fuse_residual=False, dilated_as_gemm=False,
                winograd=False, native_segformer=False, planar_heads=False, channels_last=False, inference_mode=False,
                prepack=False)
INFERENCE_ABLATION: dict[str, dict[str, Any]] = {
    "+inference_mode": {**_NOTHING, "inference_mode": True},
    "+channels_last": {**_NOTHING, "channels_last": True},
    # Packed weights are used for channels-last input, so they are measured against "+channels_last".
    "+channels_last +prepack": {**_NOTHING, "channels_last": True, "prepack": True},
    "+fold_conv_bn": {**_NOTHING, "fold_bn": True},
    # Most ReLUs follow a BatchNorm, so the fusion is measured on top of the folding.
    "+fold_conv_bn +fuse_conv_relu": {**_NOTHING, "fold_bn": True, "fuse_relu": True},
    # The shortcut fusion takes the convolutions the folding left bare; measured on top of both.
    "+fold_conv_bn +fuse_conv_relu +fuse_residual": {**_NOTHING, "fold_bn": True, "fuse_relu": True,
                                                     "fuse_residual": True},
    "+dilated_as_gemm": {**_NOTHING, "dilated_as_gemm": True},
    # Winograd's tiles are read channels last, so it is measured against "+channels_last".
    "+channels_last +winograd": {**_NOTHING, "channels_last": True, "winograd": True},
    # SegFormer's Mix-FFNs, attention projections and decoder head in native passes (float32;
    # other models have none).
    "+native_segformer": {**_NOTHING, "native_segformer": True},
    # A 3x3 head to few classes with vectors along the pixels: channels-last input, like Winograd.
    "+channels_last +planar_heads": {**_NOTHING, "channels_last": True, "planar_heads": True},
    "+bf16": {**_NOTHING, "precision": "bf16"},
    "+bf16 +channels_last": {**_NOTHING, "precision": "bf16", "channels_last": True},
    # bf16's Winograd, F(2x2) for the widest convolutions, measured against "+bf16 +channels_last".
    "+bf16 +channels_last +winograd": {**_NOTHING, "precision": "bf16", "channels_last": True, "winograd": True},
    # SegFormer's attention heads by bf16 pair products (AVX-512 BF16), measured against "+bf16".
    "+bf16 +native_segformer": {**_NOTHING, "precision": "bf16", "native_segformer": True},
    "fast, fp32 (--precision 32)": dict(precision="32"),
}
TRAINING_ABLATION: dict[str, dict[str, Any]] = {
    "+channels_last": dict(channels_last=True, precision="32", fused=False, winograd=False),
    "+channels_last +winograd": dict(channels_last=True, precision="32", fused=False, winograd=True),
    # oneDNN's weight gradient is slow on channels-last maps: measured against "+channels_last".
    "+channels_last +tuned weight gradients": dict(channels_last=True, precision="32", fused=False, winograd=False,
                                                   tuned_gradients=True),
    "+bf16 autocast": dict(channels_last=False, precision="bf16", fused=False, winograd=False),
    "+bf16 autocast +channels_last": dict(channels_last=True, precision="bf16", fused=False, winograd=False),
    # bf16's Winograd, F(2x2) for the widest convolutions, measured against "+bf16 autocast +channels_last".
    "+bf16 autocast +channels_last +winograd": dict(channels_last=True, precision="bf16", fused=False, winograd=True),
    # seglab's CrossEntropyLoss (one native pass on the CPU) on the bf16 logits, against the row above.
    "+bf16 autocast +channels_last +winograd +native cross-entropy": dict(channels_last=True, precision="bf16",
                                                                         fused=False, winograd=True, native_loss=True),
    # BatchNorm with the ReLU (or a ResNet block's shortcut addition and ReLU) after it in one
    # native kernel (the trainer's default in bf16 on the CPU, `--native-norms`), against the row above.
    "+bf16 autocast +channels_last +winograd +native cross-entropy +native norms": dict(
        channels_last=True, precision="bf16", fused=False, winograd=True, native_loss=True, native_norms=True),
    # SegFormer's attention heads by the native kernel forward and its own backward (AVX-512 BF16;
    # the trainer's default there, `--native-attention`; other models have none), against the row above.
    "+bf16 autocast +channels_last +winograd +native cross-entropy +native norms +native attention": dict(
        channels_last=True, precision="bf16", fused=False, winograd=True, native_loss=True, native_norms=True,
        native_attention=True),
    # SegFormer's Mix-FFN depthwise convolution and GELU by one native kernel each way (the trainer's
    # default in bf16 on the CPU, `--native-mix-ffn`), against the row above.
    "+bf16 autocast +channels_last +winograd +native cross-entropy +native norms +native attention +native Mix-FFN":
        dict(channels_last=True, precision="bf16", fused=False, winograd=True, native_loss=True, native_norms=True,
             native_attention=True, native_mix_ffn=True),
    # The class scores' bilinear upsampling by the native kernel forward and backward (the
    # trainer's default in CPU training, `seglab.ops.upsample.native_score_upsampling`), against the row above.
    "+bf16 autocast +channels_last +winograd +native cross-entropy +native norms +native attention +native Mix-FFN "
    "+native score upsampling": dict(channels_last=True, precision="bf16", fused=False, winograd=True, native_loss=True,
                                     native_norms=True, native_attention=True, native_mix_ffn=True,
                                     native_upsampling=True),
    "+fused optimizer": dict(channels_last=False, precision="32", fused=True, winograd=False),
}


@dataclass
class BenchSettings:
    models: list[str] = field(default_factory=lambda: list(ARCHITECTURES))
    size: int = 512
    batches: list[int] = field(default_factory=lambda: [1, 8])
    train_batch: int = 8
    repeats: int = 5
    # Two untimed rounds: the first training step of a fast path times its weight-gradient
    # kernels and touches fresh memory, and one more round was needed before the steps
    # settled (UNet-R34: 1.19x after one warm-up round, 1.53x after two; docs/bench.md).
    warmup: int = 2
    # Up to this many more warm-up rounds while a call still spends over NOTED_SYSTEM_SHARE of
    # its wall time in the kernel: on a VM whose host backs fresh pages on first touch, training
    # steps kept faulting for two more rounds after two warm-up rounds (docs/bench.md).
    settle_rounds: int = 3
    num_classes: int = 21
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    precision: str = "auto"
    peers: bool = True
    train: bool = True
    ablation: list[str] = field(default_factory=list)  # architecture keys that get ablation rows
    compile: bool = False
    # an "int8" inference row (the float32 fast path with 8-bit products, `seglab.engine.int8`),
    # calibrated on INT8_CALIBRATION_BATCHES random images, and a training row with int8 products
    # (`seglab.ops.int8_products`); None: on CPUs that run int8
    int8: bool | None = None
    accuracy: bool = False
    accuracy_epochs: int = ACCURACY_EPOCHS
    calibration_size: int = 128
    seed: int = 0

    def validate(self) -> None:
        for flag, keys in (("--models", self.models), ("--ablation", self.ablation)):
            unknown = [m for m in keys if m not in ARCHITECTURES]
            if unknown:
                raise ValueError(f"{flag}: unknown architecture {unknown[0]!r}; known: {', '.join(ARCHITECTURES)}")
        if self.size < 32 or self.size % 32:
            raise ValueError(f"--size must be a multiple of 32 of at least 32, not {self.size}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"--batch sizes must be positive integers, not {self.batches}")
        if self.train and self.train_batch < 2:
            raise ValueError(f"--train-batch must be at least 2 (BatchNorm needs two samples), not {self.train_batch}")
        if self.accuracy_epochs < 1:
            raise ValueError(f"--accuracy-epochs must be at least 1, not {self.accuracy_epochs}")
        if self.repeats < 1 or self.warmup < 0 or self.settle_rounds < 0:
            raise ValueError(f"--repeats must be at least 1, --warmup and --settle-rounds at least 0, not "
                             f"{self.repeats} / {self.warmup} / {self.settle_rounds}")
        for device in self.devices:
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"--device {device}: no CUDA device is available")
            if not device.startswith(("cpu", "cuda")):
                raise ValueError(f"--device must be cpu, cuda or cuda:N, not {device!r}")
            if device == "cpu" and self.precision == "16":
                raise ValueError("--precision 16 (float16) needs a CUDA device; on the CPU use bf16 or auto")
            if device == "cpu" and self.precision == "bf16" and not cpu_runs_bf16():
                raise ValueError("--precision bf16: this CPU has no bfloat16 support; use 32 or auto")
        if self.int8 and not cpu_runs_int8():
            raise ValueError("--int8: this CPU has no VNNI or AMX 8-bit products")

    def int8_on(self, device: torch.device) -> bool:
        """Whether `device` gets the int8 rows (inference, and training where `train`)."""
        return device.type == "cpu" and (cpu_runs_int8() if self.int8 is None else self.int8)


# ------------------------------------------------------------------------------ measuring
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A call that spends more than this share of its wall time in the kernel ran in a process still
# faulting in fresh memory, not yet in its steady state: the bench warms up further
# (`settle_rounds`) and names timed rows above it under the table.
NOTED_SYSTEM_SHARE = 0.1


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed calls."""
    return time_interleaved([fn], device, warmup, repeats)[0]


def time_interleaved(fns: list[Callable[[], Any]], device: torch.device, warmup: int, repeats: int) -> list[list[float]]:
    """Seconds of `repeats` calls of each of `fns`, timed in rounds (one call of each per
    round), so that a change of machine load in the middle hits every candidate alike."""
    return timed_rounds(fns, device, warmup, repeats)[0]


def _system_seconds() -> float:
    """CPU seconds this process (all its threads) has spent in the kernel so far."""
    return os.times().system


def timed_rounds(fns: list[Callable[[], Any]], device: torch.device, warmup: int, repeats: int,
                 settle_rounds: int = 0) -> tuple[list[list[float]], list[list[float]]]:
    """`time_interleaved`'s seconds, and the system CPU seconds the process spent during each
    timed call. On Linux those are mostly page faults on memory the process had not touched
    before: a process still growing its heap runs slower than a warm one (on a VM whose host
    backs each fresh page on its first touch, by about 6 s per GB; docs/bench.md). After the
    `warmup` rounds, up to `settle_rounds` more untimed rounds run while any call of the last
    round spent over `NOTED_SYSTEM_SHARE` of its wall time in the kernel."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _synchronize(device)
    for _ in range(settle_rounds):
        seconds, system = _one_round(fns, device)
        if all(kernel <= NOTED_SYSTEM_SHARE * wall for wall, kernel in zip(seconds, system)):
            break
    seconds_per_call: list[list[float]] = [[] for _ in fns]
    system_per_call: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for times, kernel_times, wall, kernel in zip(seconds_per_call, system_per_call, *_one_round(fns, device)):
            times.append(wall)
            kernel_times.append(kernel)
    return seconds_per_call, system_per_call


def _one_round(fns: list[Callable[[], Any]], device: torch.device) -> tuple[list[float], list[float]]:
    """One call of each of `fns`: its wall seconds and the process's system seconds during it."""
    seconds, system = [], []
    for fn in fns:
        start, kernel_start = time.perf_counter(), _system_seconds()
        fn()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
        system.append(_system_seconds() - kernel_start)
    return seconds, system


def calibration_kernels(device: torch.device, size: int) -> dict[str, tuple[Callable[[], Any], int]]:
    """The calibration kernel per precision: a 3x3, 256 -> 256 channel convolution on a `size` x
    `size` map in channels_last, float32 and (where the device computes it, natively or not)
    bfloat16. Returns name -> (call, FLOPs of one call)."""
    channels = 256
    flops = 2 * channels * channels * 9 * size * size
    dtypes = {"fp32": torch.float32}
    if device.type == "cuda" or cpu_runs_bf16():
        dtypes["bf16"] = torch.bfloat16
    kernels = {}
    for name, dtype in dtypes.items():
        conv = to_channels_last(nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype))
        x = to_channels_last(torch.randn(1, channels, size, size, device=device, dtype=dtype))

        def call(conv: nn.Module = conv, x: torch.Tensor = x) -> Any:
            with torch.inference_mode():
                return conv(x)

        kernels[name] = (call, flops)
    return kernels


def calibrate(device: torch.device, size: int, warmup: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of each calibration kernel (median of `repeats` timed calls)."""
    kernels = calibration_kernels(device, size)
    seconds = time_interleaved([call for call, _ in kernels.values()], device, max(warmup, 1), max(repeats, 3))
    return {name: flops / statistics.median(times) / 1e9 for (name, (_, flops)), times in zip(kernels.items(), seconds)}


def _logits(output: Any) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


def _cpu_flash_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one, which
# scaled_dot_product_attention runs here: without this, a transformer's attention counts zero.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def _parameter_count(build: Callable[[], nn.Module]) -> int:
    return sum(p.numel() for p in build().parameters())


def _flops(build: Callable[[], nn.Module], size: int) -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward pass of one image, counted on a real
    pass: what actually runs, attention kernels included."""
    model = build().eval()
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


def _inference_call(model: nn.Module, batch: int, settings: BenchSettings, device: torch.device) -> Callable[[], Any]:
    images = torch.randn(batch, 3, settings.size, settings.size, device=device)

    def call() -> Any:
        with torch.no_grad():
            return model(images)

    return call


def _training_call(model: nn.Module, settings: BenchSettings, device: torch.device, *, channels_last: bool,
                   precision: str, fused: bool, winograd: bool, tuned_gradients: bool = False,
                   native_loss: bool = False, native_norms: bool = False, native_attention: bool = False,
                   native_mix_ffn: bool = False, native_upsampling: bool = False,
                   int8_products: bool = False) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward, AdamW step) on a fixed random batch;
    with `winograd` and `tuned_gradients`, under `training_convolutions` (in float32 on the CPU
    Winograd's 3x3 convolutions, the other convolutions' weight gradients by the kernel timed
    fastest), and with `native_loss` the loss by seglab's `CrossEntropyLoss` on the logits as
    they come (on the CPU one native pass), and with `native_norms` the BatchNorms with what
    follows them by one native kernel (`training_norms`), with `native_attention` SegFormer's
    attention heads by the native kernel and its own backward (`training_attention`), with
    `native_mix_ffn` the Mix-FFN's depthwise convolution and GELU by one native kernel each way
    (`training_mix_ffn`), with `native_upsampling` the class scores' upsampling by the native
    kernel forward and backward (`native_score_upsampling`; off, PyTorch's), and with
    `int8_products` the large 1x1 convolutions and atrous windows by int8 products (float32
    only), as seglab's trainer runs."""
    model = model.to(device).train()
    if channels_last:
        model = to_channels_last(model)
    options = optimizer_options("adamw", device) if fused else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **options)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    images = torch.randn(settings.train_batch, 3, settings.size, settings.size, generator=generator).to(device)
    if channels_last:
        images = to_channels_last(images)
    target = torch.randint(0, settings.num_classes, (settings.train_batch, settings.size, settings.size),
                           generator=generator).to(device)

    convolutions = training_convolutions(model, device, precision, enabled=winograd or tuned_gradients,
                                         winograd=winograd, tuned_weight_gradients=tuned_gradients,
                                         int8_products=int8_products)
    norms = training_norms(model, device, precision, enabled=native_norms)
    attention = training_attention(model, device, precision, enabled=native_attention)
    mix_ffn = training_mix_ffn(model, device, precision, enabled=native_mix_ffn)
    seglab_loss = CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with (autocast_context(device, precision), convolutions, norms, attention, mix_ffn,
              native_score_upsampling(native_upsampling)):
            logits = _logits(model(images))
        if native_loss:
            loss = seglab_loss(logits, target)
        else:
            # Cross-entropy read in the logits' own layout (channels-last ones as a pixels x classes
            # matrix); NCHW logits, the peers', go to F.cross_entropy as they are.
            loss = pixel_cross_entropy(logits.float(), target).mean()
        loss.backward()
        optimizer.step()

    return step


class _Recorder:
    """Collects result rows and advances the progress bar."""

    def __init__(self, progress: Any | None, total: int) -> None:
        self.rows: list[dict[str, Any]] = []
        self.progress = progress
        self.task = progress.add_task("bench", total=total, info="") if progress is not None else None

    def announce(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, info=text)

    def add(self, candidate: _Candidate, seconds: list[float], system_seconds: list[float], batch: int,
            peaks: dict[str, float], **fields: Any) -> None:
        """A result row; `peaks` are the calibration kernels' GFLOP/s timed alongside it."""
        images_per_s = batch / statistics.median(seconds)
        # Training costs about 3x the forward FLOPs (forward, gradients of inputs and of weights).
        flops_per_image = candidate.flops * (3 if fields["mode"] == "train" else 1)
        achieved = flops_per_image * images_per_s / 1e9
        peak = peaks.get({"32": "fp32", "bf16": "bf16"}.get(candidate.precision, ""))  # fp16 is not calibrated
        self.rows.append({**fields, "library": candidate.library, "variant": candidate.variant,
                          "precision": candidate.precision, "batch": batch, "images_per_s": images_per_s,
                          "seconds": seconds, "system_seconds": system_seconds,
                          "gflops_per_image": flops_per_image / 1e9, "achieved_gflops": achieved,
                          "peak_gflops": peak, "fraction_of_peak": achieved / peak if peak else None})
        if self.progress is not None:
            self.progress.update(self.task, advance=1)


def _count_steps(settings: BenchSettings) -> int:
    int8 = any(settings.int8_on(torch.device(device)) for device in settings.devices)
    per_model = len(settings.batches) * (2 + settings.peers + int8) + settings.train * (2 + settings.peers + int8)
    ablation = len(settings.ablation) * (
        len(settings.batches) * (len(INFERENCE_ABLATION) + settings.compile) + settings.train * len(TRAINING_ABLATION)
    )
    return len(settings.devices) * (len(settings.models) * per_model + ablation)


@dataclass
class _Candidate:
    library: str
    variant: str
    flops: int  # of one image's forward pass
    precision: str
    build: Callable[[], Any]  # -> the callable to time (built lazily: training holds optimizer state)


def _inference_candidates(arch: Architecture, settings: BenchSettings, device: torch.device, precision: str,
                          build_seglab: Callable[[], nn.Module], flops: int, peer_flops: int | None) -> list[_Candidate]:
    torch.manual_seed(settings.seed)
    seglab_model = build_seglab().to(device).eval()
    candidates = [
        _Candidate("seglab", "eager fp32", flops, "32", lambda: seglab_model),
        _Candidate("seglab", f"fast ({precision})", flops, precision, lambda: optimize_for_inference(seglab_model, precision)),
    ]
    if settings.int8_on(device):
        calibration = [torch.randn(1, 3, settings.size, settings.size, generator=torch.Generator().manual_seed(i))
                       for i in range(INT8_CALIBRATION_BATCHES)]
        candidates.append(_Candidate("seglab", INT8_VARIANT, flops, "int8", lambda: optimize_for_inference(
            seglab_model, "int8", calibration=calibration)))
    if peer_flops is not None:
        candidates.append(_Candidate(arch.peer, "eager fp32", peer_flops, "32",
                                     lambda: arch.peer_builder(settings.num_classes).to(device).eval()))
    if arch.key in settings.ablation:
        for variant, options in INFERENCE_ABLATION.items():
            candidates.append(_Candidate("seglab", variant, flops, options["precision"],
                                         lambda options=options: optimize_for_inference(seglab_model, **options)))
        if settings.compile:
            candidates.append(_Candidate("seglab", f"fast ({precision}) + torch.compile", flops, precision,
                                         lambda: optimize_for_inference(seglab_model, precision, compile=True)))
    return candidates


def _training_candidates(arch: Architecture, settings: BenchSettings, device: torch.device, precision: str,
                         build_seglab: Callable[[], nn.Module], flops: int, peer_flops: int | None) -> list[_Candidate]:
    def trainer(build: Callable[[], nn.Module], **options: Any) -> Callable[[], Callable[[], None]]:
        def make() -> Callable[[], None]:
            torch.manual_seed(settings.seed)
            return _training_call(build(), settings, device, **options)

        return make

    candidates = [
        _Candidate("seglab", "eager fp32", flops, "32", trainer(build_seglab, channels_last=False, precision="32", fused=False, winograd=False)),
        _Candidate("seglab", f"fast ({precision})", flops, precision,
                   trainer(build_seglab, channels_last=True, precision=precision, fused=True, winograd=True,
                           tuned_gradients=True, native_loss=True, native_norms=True, native_attention=True,
                           native_mix_ffn=True, native_upsampling=True)),
    ]
    if settings.int8_on(device):
        candidates.append(_Candidate("seglab", INT8_TRAINING_VARIANT, flops, "int8", trainer(
            build_seglab, channels_last=True, precision="32", fused=True, winograd=True, tuned_gradients=True,
            native_loss=True, native_upsampling=True, int8_products=True)))
    if peer_flops is not None:
        candidates.append(_Candidate(arch.peer, "eager fp32", peer_flops, "32",
                                     trainer(lambda: arch.peer_builder(settings.num_classes), channels_last=False,
                                             precision="32", fused=False, winograd=False)))
    if arch.key in settings.ablation:
        for variant, options in TRAINING_ABLATION.items():
            candidates.append(_Candidate("seglab", variant, flops, options["precision"], trainer(build_seglab, **options)))
    return candidates


def _time_with_calibration(calls: list[Callable[[], Any]], kernels: dict[str, tuple[Callable[[], Any], int]],
                           device: torch.device, settings: BenchSettings
                           ) -> tuple[list[list[float]], list[list[float]], dict[str, float]]:
    """Time `calls` interleaved with the calibration kernels, so that each fraction of peak
    compares rates measured under the same machine load. Returns the calls' seconds, their
    system seconds (`timed_rounds`) and the kernels' GFLOP/s."""
    seconds, system = timed_rounds([*calls, *(call for call, _ in kernels.values())], device, settings.warmup,
                                   settings.repeats, settings.settle_rounds)
    peaks = {name: flops / statistics.median(times) / 1e9
             for (name, (_, flops)), times in zip(kernels.items(), seconds[len(calls):])}
    return seconds[: len(calls)], system[: len(calls)], peaks


def _bench_architecture(arch: Architecture, settings: BenchSettings, device: torch.device, precision: str,
                        record: "_Recorder") -> None:
    """Time every candidate of one architecture, interleaved per batch size and mode."""

    def build_seglab() -> nn.Module:
        return create_model(arch.seglab_model, num_classes=settings.num_classes, **arch.seglab_kwargs)

    kernels = calibration_kernels(device, settings.calibration_size)
    record.announce(f"{arch.title}: counting FLOPs")
    flops = _flops(build_seglab, settings.size)
    with_peer = settings.peers and arch.peer_builder is not None
    peer_flops = _flops(lambda: arch.peer_builder(settings.num_classes), settings.size) if with_peer else None
    parameters = {"seglab": _parameter_count(build_seglab)}
    if with_peer:
        parameters[arch.peer] = _parameter_count(lambda: arch.peer_builder(settings.num_classes))
    available = [c for c in _inference_candidates(arch, settings, device, precision, build_seglab, flops, peer_flops)
                 if c.precision != "bf16" or "bf16" in kernels]
    models = [c.build() for c in available]
    for batch in settings.batches:
        record.announce(f"{arch.title}: inference, batch {batch}")
        calls = [_inference_call(model, batch, settings, device) for model in models]
        seconds, system, peaks = _time_with_calibration(calls, kernels, device, settings)
        for candidate, times, kernel_times in zip(available, seconds, system):
            record.add(candidate, times, kernel_times, batch, peaks, model=arch.key, mode="inference", device=str(device),
                       parameters=parameters[candidate.library])
    del models, calls
    if not settings.train:
        return
    record.announce(f"{arch.title}: training, batch {settings.train_batch}")
    available = [c for c in _training_candidates(arch, settings, device, precision, build_seglab, flops, peer_flops)
                 if c.precision != "bf16" or "bf16" in kernels]
    steps = [c.build() for c in available]
    seconds, system, peaks = _time_with_calibration(steps, kernels, device, settings)
    for candidate, times, kernel_times in zip(available, seconds, system):
        record.add(candidate, times, kernel_times, settings.train_batch, peaks, model=arch.key, mode="train", device=str(device),
                   parameters=parameters[candidate.library])


def machine_description() -> dict[str, Any]:
    """CPU model, cores, threads, library versions, bf16 support, load average, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torchvision

    description = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_supports_bf16(),
        "cpu_bf16_emulated": cpu_runs_bf16() and not cpu_supports_bf16(),
        "cpu_amx": cpu_has("amx_tile"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import segmentation_models_pytorch as smp

        description["segmentation_models_pytorch"] = smp.__version__
    except ImportError:
        description["segmentation_models_pytorch"] = None
    # Whether freed activation maps are reused or mapped afresh (seglab's command sets it; both sides share it).
    description["malloc_keeps_freed_memory"] = keeps_freed_memory()
    # Winograd's transforms by the native kernels, or why by PyTorch's operators (seglab.ops.native).
    description["native_transforms"] = native.unavailable_reason() or "in use"
    description["load_average"] = _load_average()
    return description


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: how busy the machine was (other processes included)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run_bench(settings: BenchSettings, progress: Any | None = None) -> dict[str, Any]:
    """Run every measurement `settings` asks for; returns the JSON-ready results."""
    settings.validate()
    if settings.peers and any(ARCHITECTURES[m].peer == "smp" for m in settings.models):
        try:
            import segmentation_models_pytorch  # noqa: F401
        except ImportError:
            raise ValueError("the peer comparison needs segmentation_models_pytorch: pip install 'seglab[bench]' "
                             "(or pass --no-peers)") from None
    results: dict[str, Any] = {"machine": machine_description(), "settings": asdict(settings), "calibration": {},
                               "rows": []}
    record = _Recorder(progress, _count_steps(settings))
    for device_name in settings.devices:
        device = torch.device(device_name)
        record.announce(f"calibration kernel on {device}")
        before = calibrate(device, settings.calibration_size, settings.warmup, settings.repeats)
        precision = default_precision(device) if settings.precision == "auto" else settings.precision
        for key in [*settings.models, *(k for k in settings.ablation if k not in settings.models)]:
            _bench_architecture(ARCHITECTURES[key], settings, device, precision, record)
        # Alone, before and after the models: what the machine reaches when the kernel runs
        # by itself (the fractions of peak use the kernel timed among each model's rounds).
        record.announce(f"calibration kernel on {device}, again")
        after = calibrate(device, settings.calibration_size, settings.warmup, settings.repeats)
        results["calibration"][str(device)] = {"before": before, "after": after}
    results["rows"] = record.rows
    results["machine"]["load_average_after"] = _load_average()
    if settings.accuracy:
        record.announce("accuracy check: training on the synthetic shapes")
        results["accuracy"] = accuracy_check(settings.models[0], settings.devices[0], settings.precision,
                                             epochs=settings.accuracy_epochs, seed=settings.seed)
    return results


# ------------------------------------------------------------------------------ reporting
def _find(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in where.items())), None)


def speed_ratio(fast: dict[str, Any], peer: dict[str, Any]) -> float:
    """How many times the peer's images/s seglab's fast path ran: the median over the timed
    rounds of the peer's seconds / the fast path's in the same round (both ran in each round,
    at the same batch), so that a slow spell of the machine, which stretches one round, moves
    both sides together; the ratio of the medians for rows not timed in the same rounds."""
    if fast["batch"] == peer["batch"] and len(fast["seconds"]) == len(peer["seconds"]) > 0:
        return statistics.median(theirs / ours for ours, theirs in zip(fast["seconds"], peer["seconds"]))
    return fast["images_per_s"] / peer["images_per_s"]


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per (device, architecture) and measurement (inference at each batch, training):
    images/s of seglab's fast path, of seglab in plain fp32 and of the peer, the ratio
    fast / peer, and the fast path's fraction of the calibration kernel's rate; where an int8
    row was timed (calibrated inference, training with int8 products), its ratio to the peer too."""
    rows = results["rows"]
    has_int8 = any(r["variant"] in (INT8_VARIANT, INT8_TRAINING_VARIANT) for r in rows)
    lines = []
    for device in results["calibration"]:
        for key in dict.fromkeys(r["model"] for r in rows if r["device"] == device):
            arch = ARCHITECTURES[key]
            for mode in ("inference", "train"):
                for batch in dict.fromkeys(r["batch"] for r in rows if r["model"] == key and r["mode"] == mode):
                    where = dict(device=device, model=key, mode=mode, batch=batch)
                    fast = next((r for r in rows if all(r[k] == v for k, v in where.items()) and r["library"] == "seglab"
                                 and r["variant"].startswith("fast (") and "compile" not in r["variant"]), None)
                    plain = _find(rows, library="seglab", variant="eager fp32", **where)
                    int8 = _find(rows, library="seglab", variant=INT8_VARIANT if mode == "inference"
                                 else INT8_TRAINING_VARIANT, **where)
                    peer = _find(rows, library=arch.peer, **where) if arch.peer else None
                    if fast is None:
                        continue
                    lines.append({
                        "device": device, "model": arch.title, "mode": mode, "batch": batch,
                        "seglab fast": fast["images_per_s"], "seglab fp32": plain["images_per_s"] if plain else None,
                        "peer": f"{arch.peer}" if peer else None, "peer fp32": peer["images_per_s"] if peer else None,
                        "ratio": speed_ratio(fast, peer) if peer else None,
                        "GFLOPs seglab/peer": f"{fast['gflops_per_image']:.1f} / {peer['gflops_per_image']:.1f}"
                        if peer else f"{fast['gflops_per_image']:.1f}",
                        # A ratio between different networks is not a like-for-like speed-up. The
                        # parameters tell (FLOPs do not: seglab may compute the same function with
                        # fewer, as SegFormer's re-associated decoder does).
                        "same net": None if peer is None else _same_size(fast.get("parameters"), peer.get("parameters")),
                        "fraction of peak": fast["fraction_of_peak"],
                        **({"int8 ratio": speed_ratio(int8, peer) if int8 and peer else None} if has_int8 else {}),
                    })
    return lines


def system_share(row: dict[str, Any]) -> float | None:
    """The system CPU seconds of a row's timed calls per second of their wall time (all
    threads, so it can exceed 1); None for rows recorded without them."""
    system = row.get("system_seconds")
    return sum(system) / sum(row["seconds"]) if system is not None and sum(row["seconds"]) > 0 else None


def _same_size(ours: int | None, theirs: int | None) -> bool | None:
    """Parameter counts within 5% (None when a row predates the count)."""
    if ours is None or theirs is None:
        return None
    return abs(ours - theirs) <= 0.05 * theirs


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cpu_fast_path_ran(results: dict[str, Any], precision: str) -> bool:
    """Whether the CPU's fast-path rows of `results` ran in `precision` (what `auto` picked there)."""
    return any(r["variant"].startswith("fast (") and r.get("precision") == precision and r["device"] == "cpu"
               for r in results["rows"])


def to_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: machine, calibration, comparison, ablation, accuracy."""
    machine = results["machine"]
    settings = results["settings"]
    out = ["## Machine", ""]
    out += [f"- {k}: {_fmt(v)}" for k, v in machine.items()]
    size = settings["calibration_size"]
    out += ["", f"## Calibration kernel (3x3 conv 256->256 on {size}x{size}, channels_last), GFLOP/s", "",
            "Alone before and after the models; each fraction of peak below divides by the same kernel timed in "
            "the rounds of that very measurement (same machine load).", "",
            "| device | precision | before the models | after |", "|---|---|---|---|"]
    for device, peaks in results["calibration"].items():
        out += [f"| {device} | {name} | {peaks['before'][name]:.1f} | {peaks['after'][name]:.1f} |"
                for name in peaks["before"]]
    settling = f" + up to {settings['settle_rounds']} while faulting" if settings.get("settle_rounds") else ""
    out += ["", f"## seglab vs peers ({settings['size']}x{settings['size']}, {settings['num_classes']} classes, "
            f"median of {settings['repeats']} after {settings['warmup']} warm-up{settling})", "",
            "images/s (batch / median seconds); ratio = seglab fast path / peer used as its README shows (eval, "
            "no_grad, fp32), the median of the per-round ratios (both run in every round); "
            "fraction of peak = achieved GFLOP/s of the fast path / calibration kernel of the same precision, timed in the same rounds "
            "(training counted as 3x the forward FLOPs); same net = the two networks' parameter counts agree within 5%.", ""]
    lines = comparison_rows(results)
    if lines:
        columns = list(lines[0])
        out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(_fmt(line.get(c)) for c in columns) + " |" for line in lines]
    float32_default = _cpu_fast_path_ran(results, "32")
    if float32_default and any(r["variant"] == INT8_VARIANT for r in results["rows"]):
        out += ["", "On this CPU `seglab predict --precision auto` runs the int8 path for a checkpoint that stores "
                "int8 ranges checked within 0.2 points of float32 (`seglab train` stores them on CPUs with VNNI or "
                "AMX: docs/engine.md), the float32 fast path otherwise."]
    if (_cpu_fast_path_ran(results, "bf16") and results["machine"].get("cpu_amx") is False
            and any(r["variant"] == INT8_VARIANT for r in results["rows"])):
        out += ["", "On this CPU (bf16 by AVX-512 BF16, without AMX) `seglab predict --precision auto` runs the int8 "
                "path for a checkpoint that stores int8 ranges checked within 0.2 points of float32 where int8 takes "
                f"at least {INT8_OVER_BF16_SHARE:.0%} of the network's FLOPs (convolution networks; not SegFormer), "
                "the bf16 fast path otherwise (docs/engine.md)."]
    if float32_default and any(r["variant"] == INT8_TRAINING_VARIANT for r in results["rows"]):
        out += ["", "On this CPU `seglab train --precision auto` (the default) trains as the int8 ratio's row "
                "(int8 products for the large 1x1 convolutions and atrous windows); `--precision 32` as the ratio's row (float32 "
                "throughout)."]
    faulting = [r for r in results["rows"] if (system_share(r) or 0.0) > NOTED_SYSTEM_SHARE]
    if faulting:
        out += ["", f"Timed calls that spent over {NOTED_SYSTEM_SHARE:.0%} of their wall time in the kernel (mostly page "
                "faults on fresh memory: that process had not reached its steady state), system seconds per call:", ""]
        out += [f"- {r['device']} {ARCHITECTURES[r['model']].title} {r['mode']} batch {r['batch']}, {r['library']} "
                f"{r['variant']}: {system_share(r):.0%} ({', '.join(f'{t:.2f}' for t in r['system_seconds'])})"
                for r in faulting]
    ablation = [r for r in results["rows"] if r["model"] in settings["ablation"] and r["library"] == "seglab"]
    if ablation:
        out += ["", "## Ablation: one optimisation at a time", "",
                "| device | model | mode | variant | batch | images/s | GFLOP/s | fraction of peak |", "|---|---|---|---|---|---|---|---|"]
        for r in ablation:
            out.append(f"| {r['device']} | {ARCHITECTURES[r['model']].title} | {r['mode']} | {r['variant']} | {r['batch']} | "
                       f"{r['images_per_s']:.2f} | {r['achieved_gflops']:.1f} | {_fmt(r['fraction_of_peak'])} |")
    accuracy = results.get("accuracy")
    if accuracy:
        out += ["", "## Accuracy of the fast path", ""]
        out += [f"- {k}: {_fmt(v, 4)}" for k, v in accuracy.items()]
    return "\n".join(out) + "\n"


def _comparison_table(results: dict[str, Any]) -> Any:
    from rich.table import Table

    settings = results["settings"]
    table = Table(title=f"seglab fast path vs peers, images/s at {settings['size']}x{settings['size']}")
    lines = comparison_rows(results)
    columns = [c for c in (lines[0] if lines else {}) if c not in ("device", "seglab fp32")]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "mode", "peer") else "right")
    for line in lines:
        table.add_row(*(_fmt(line.get(c)) for c in columns))
    return table


# A float32 model within this many points of painting everything background has learned too
# little for the comparison to say much: agreement is then near 1 whatever the arithmetic.
LEARNED_MARGIN = 10.0


def accuracy_line(accuracy: dict[str, Any]) -> str:
    """The accuracy check in one line, with a second when the model learned too little."""
    line = (f"accuracy ({accuracy['model']}): mIoU fp32 {accuracy['miou_fp32']:.2f} (background only "
            f"{accuracy['miou_background_only']:.2f}), fast inference {accuracy['miou_fast_inference']:.2f}, "
            f"fast training {accuracy['miou_fast_training']:.2f}, argmax agreement {accuracy['argmax_agreement']:.4f}")
    if accuracy["miou_fp32"] < accuracy["miou_background_only"] + LEARNED_MARGIN:
        line += (f"\nthe float32 model is within {LEARNED_MARGIN:.0f} points of painting everything background: "
                 "it learned too little for the comparison to tell much (--accuracy-epochs)")
    return line


def bench_command(options: dict[str, Any], console: Any) -> int:
    """`seglab bench`: run, print the comparison, write `bench.json` and `bench.md` to `out`."""
    from pathlib import Path

    from rich.console import Console

    from seglab.engine.trainer import progress_bar
    from seglab.files import atomic_write_json, atomic_write_text, output_folder

    out = Path(options.pop("out"))
    threads = options.pop("threads")
    previous_threads = torch.get_num_threads()
    devices = options.pop("devices")
    if devices == ["auto"]:
        devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    known = {f.name for f in fields(BenchSettings)}
    settings = BenchSettings(devices=devices, **{k: v for k, v in options.items() if k in known and v is not None})
    settings.validate()
    output_folder(out)  # an unusable --out is one line now, not after the whole run
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with progress_bar(console) as progress:
            results = run_bench(settings, progress)
    finally:  # the caller's thread count, e.g. when called from Python or a test session
        torch.set_num_threads(previous_threads)
    atomic_write_json(out / "bench.json", results)
    atomic_write_text(out / "bench.md", to_markdown(results))
    Console().print(_comparison_table(results))
    if "accuracy" in results:
        Console().print(accuracy_line(results["accuracy"]))
    Console().print(f"results in {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
