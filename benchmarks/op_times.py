"""Where a model's inference call or training step spends its time, operator by operator: each
ATen operator's wall time, taken around the operator itself by a dispatch mode. Not a test: it
prints two tables, by operator and by operator and input shapes.

    python benchmarks/op_times.py --model fpn-r34 --mode train       # seglab's training route
    python benchmarks/op_times.py --model fpn-r34 --mode train --peer   # the peer library's model
    python benchmarks/op_times.py --model unet-r34 --mode infer --batch 8 --top 40
    python benchmarks/op_times.py --model deeplabv3-r50 --int8-products   # 1x1 and ASPP products in int8

Why not torch.profiler: on a KVM guest (the 2-core Zen 3 EPYC of docs/bench.md) its figures
for memory-bound operators came out 2-6x the operator's own time. A UNet-R34 training step
(batch 4, 512 x 512) profiled at 7.3 s against 4.6 s unprofiled; the 16 -> 16 channel
convolution's backward on 512 x 512 at 369 ms, where this timer measured 95-123 ms in the same
step and 101-125 ms alone in the same process, and a 88 MB `fill_` at 250 ms against 4 ms
alone. This timer adds a few microseconds per operator (a step's total stays within the run to
run noise) and reports what each operator took, so the sum of a table is the step's time less
Python's share.

The model is built as `seglab bench` builds it (random weights, 21 classes); the training step
is the bench's (`seglab.bench._training_call`: channels last, the training route, AdamW, the
cross-entropy), inference the fast path (`optimize_for_inference`), both at float32 unless
`--precision bf16` asks for seglab's bf16 fast path.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seglab.bench import ARCHITECTURES, BenchSettings, _training_call
from seglab.engine.fastpath import optimize_for_inference
from seglab.memory import keep_freed_memory
from seglab.models import create_model
from seglab.ops import native


class OperatorTimes(TorchDispatchMode):
    """Wall seconds per ATen operator, and per operator and the shapes of its first three
    tensor arguments, of everything run inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.by_operator: collections.Counter[str] = collections.Counter()
        self.by_shapes: collections.Counter[tuple[str, tuple]] = collections.Counter()
        self.calls: collections.Counter[tuple[str, tuple]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        start = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        self.record(func.__name__, args, time.perf_counter() - start)
        return result

    def record(self, name: str, args: tuple, elapsed: float) -> None:
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:3]
        self.by_operator[name] += elapsed
        self.by_shapes[(name, shapes)] += elapsed
        self.calls[(name, shapes)] += 1

    @contextlib.contextmanager
    def native_kernels(self) -> Iterator[None]:
        """Times seglab's native kernels (`seglab.ops.native`, called through ctypes, which the
        dispatcher does not see) as operators named `native.<function>`; their output's
        allocation (`new_empty`) is counted both there and as its own operator."""
        names = ("gather_tiles", "scatter_tiles", "add_upsampled_", "resize_bilinear", "resize_bilinear_backward",
                 "winograd_fused", "mix_ffn",
                 "mlp_head", "attention", "attention_score_grads", "attention_grads", "linear", "batch_norm_forward",
                 "batch_norm_backward", "cross_entropy", "planar_conv3x3", "quantize_u8", "quantize_rows_s8",
                 "dequantize_rows", "depthwise_gelu", "depthwise_gelu_backward")
        originals = {name: getattr(native, name) for name in names}

        def timed(name: str, function: Callable) -> Callable:
            def call(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                result = function(*args, **kwargs)
                self.record(f"native.{name}", args, time.perf_counter() - start)
                return result
            return call

        try:
            for name, function in originals.items():
                setattr(native, name, timed(name, function))
            yield
        finally:
            for name, function in originals.items():
                setattr(native, name, function)


def _call(model_key: str, mode: str, batch: int, size: int, peer: bool, precision: str, int8_products: bool = False,
          native_attention: bool = True, native_mix_ffn: bool = True) -> Callable[[], None]:
    arch = ARCHITECTURES[model_key]
    if peer and arch.peer_builder is None:
        raise SystemExit(f"--peer: {model_key} has no peer model")
    torch.manual_seed(0)
    model = arch.peer_builder(21) if peer else create_model(arch.seglab_model, num_classes=21, **arch.seglab_kwargs)
    if mode == "train":
        settings = BenchSettings(models=[model_key], train_batch=batch, size=size)
        ours = not peer
        return _training_call(model, settings, torch.device("cpu"), channels_last=ours,
                              precision=precision if ours else "32", fused=ours, winograd=ours, tuned_gradients=ours,
                              native_loss=ours, native_norms=ours, native_attention=native_attention and ours,
                              native_mix_ffn=native_mix_ffn and ours, native_upsampling=ours,
                              int8_products=int8_products and ours)
    runnable = model.eval() if peer else optimize_for_inference(model.eval(), precision)
    images = torch.randn(batch, 3, size, size)

    def infer() -> None:
        with torch.no_grad():
            runnable(images)

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unet-r34", choices=list(ARCHITECTURES))
    parser.add_argument("--mode", default="train", choices=["train", "infer"])
    parser.add_argument("--batch", type=int, default=None, help="default: 4 in training, 1 in inference")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--peer", action="store_true", help="the peer library's model, as `seglab bench` runs it")
    parser.add_argument("--warmup", type=int, default=4, help="untimed calls first (the tuning, fresh memory)")
    parser.add_argument("--top", type=int, default=30, help="rows of the table by shapes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="32", choices=["32", "bf16"],
                        help="seglab's precision (default 32; the peer always runs float32)")
    parser.add_argument("--int8-products", action="store_true",
                        help="training: the large 1x1 convolutions and the ASPP's windows by int8 products "
                             "(seglab.ops.int8_products)")
    parser.add_argument("--native-attention", action=argparse.BooleanOptionalAction, default=True,
                        help="training in bf16: SegFormer's attention heads by the native kernel and its own "
                             "backward (seglab.engine.attention), as the trainer and the bench's fast row run "
                             "them (default); --no-native-attention: PyTorch's flash attention")
    parser.add_argument("--native-mix-ffn", action=argparse.BooleanOptionalAction, default=True,
                        help="training in bf16: the Mix-FFN's depthwise convolution and GELU by one native kernel "
                             "each way (seglab.engine.mix_ffn), as the trainer and the bench's fast row run them "
                             "(default); --no-native-mix-ffn: PyTorch's operators")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    keep_freed_memory()  # as seglab's commands run
    batch = options.batch or (4 if options.mode == "train" else 1)
    call = _call(options.model, options.mode, batch, options.size, options.peer, options.precision,
                 options.int8_products, options.native_attention, options.native_mix_ffn)
    for _ in range(options.warmup):
        call()
    plain = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        plain.append(time.perf_counter() - start)
    # The faster of two timed calls: the other absorbed more of the machine's noise.
    timed = []
    for _ in range(2):
        with OperatorTimes() as times, times.native_kernels():
            start = time.perf_counter()
            call()
        timed.append((time.perf_counter() - start, times))
    seconds, times = min(timed, key=lambda pair: pair[0])
    who = f"{ARCHITECTURES[options.model].peer}'s" if options.peer else "seglab's"
    print(f"{who} {options.model}, {options.mode}, batch {batch}, {options.size} x {options.size}, "
          f"{'float32' if options.peer else options.precision}, "
          f"{torch.get_num_threads()} threads")
    print(f"untimed calls: median {statistics.median(plain):.3f} s; timed call {seconds:.3f} s, "
          f"of which in operators {sum(times.by_operator.values()):.3f} s\n")
    print("| operator | ms |\n|---|---|")
    for name, spent in times.by_operator.most_common(15):
        print(f"| {name} | {spent * 1e3:.1f} |")
    print("\n| operator | input shapes | calls | ms |\n|---|---|---|---|")
    for (name, shapes), spent in times.by_shapes.most_common(options.top):
        print(f"| {name} | {shapes} | {times.calls[(name, shapes)]} | {spent * 1e3:.1f} |")


if __name__ == "__main__":
    main()
