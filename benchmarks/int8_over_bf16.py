"""int8 inference against bf16 on a CPU that runs both: the figures behind `--precision auto`'s
choice between them (`seglab.engine.int8_checkpoint.INT8_OVER_BF16_SHARE`). Not a test: it
prints a Markdown table.

    python benchmarks/int8_over_bf16.py
    python benchmarks/int8_over_bf16.py --size 256 --rounds 9

Each network at random initialisation, batch 1: the bf16 fast path (`optimize_for_inference(model,
"bf16")`) and int8 (calibrated on two random images), in interleaved rounds; the share of the
network's FLOPs int8 takes (`int8_share`; "auto" takes int8 from `INT8_OVER_BF16_SHARE` on) and
what "auto" picks for a checkpoint with an int8 record within tolerance on this CPU.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from seglab.bench import ARCHITECTURES
from seglab.engine.fastpath import optimize_for_inference
from seglab.engine.int8 import cpu_runs_int8
from seglab.engine.int8_checkpoint import Int8Record, auto_inference_precision, int8_share
from seglab.engine.precision import cpu_has, cpu_supports_bf16
from seglab.memory import keep_freed_memory
from seglab.models.registry import create_model
from winograd import interleaved

RECORD_WITHIN = Int8Record({"conv": (0.0, 1.0)}, 2, 0.5, 0.5)  # a checkpoint's int8 record that scored as float32

# (title, model, options): the quick-start U-Net at three widths, then the bench's architectures
NETWORKS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("U-Net, 16 base channels (`seglab train`'s)", "unet", {"base_channels": 16, "depth": 4}),
    ("U-Net, 24 base channels", "unet", {"base_channels": 24, "depth": 4}),
    ("U-Net, 32 base channels", "unet", {"base_channels": 32, "depth": 4}),
    *((arch.title, arch.seglab_model, arch.seglab_kwargs) for key, arch in ARCHITECTURES.items() if key != "pspnet-r34-os8"),
)


def row(title: str, name: str, options: dict[str, Any], size: int, rounds: int) -> str:
    torch.manual_seed(0)
    model = create_model(name, num_classes=21, **options).eval()
    share = int8_share(model)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(1, 3, size, size, generator=generator) for _ in range(2)]
    x = torch.randn(1, 3, size, size, generator=generator)
    bf16 = optimize_for_inference(model, "bf16")
    int8 = optimize_for_inference(model, "int8", calibration=calibration)
    with torch.inference_mode():
        seconds, ratios = interleaved([lambda: bf16(x), lambda: int8(x)], rounds)
    chosen = auto_inference_precision(torch.device("cpu"), RECORD_WITHIN, model)
    return (f"| {title} | {share:.2f} | {seconds[0] * 1e3:.1f} | {seconds[1] * 1e3:.1f} | {ratios[1]:.2f}x | {chosen} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if not cpu_runs_int8():
        raise SystemExit("this CPU has no VNNI or AMX 8-bit products: int8 is refused here")
    if not cpu_supports_bf16():
        raise SystemExit("this CPU has no native bfloat16: auto picks between int8 and float32 here")
    keep_freed_memory()
    amx = " (AMX: auto keeps bf16 whatever the figures)" if cpu_has("amx_tile") else ""
    print(f"{torch.get_num_threads()} threads, batch 1, {args.size} x {args.size}, median of {args.rounds} rounds{amx}\n")
    print("| network | share of FLOPs int8 takes | bf16, ms | int8, ms | bf16 / int8 | auto's choice |")
    print("|---|---|---|---|---|---|")
    for title, name, options in NETWORKS:
        print(row(title, name, options, args.size, args.rounds), flush=True)


if __name__ == "__main__":
    main()
