"""Does bf16 training through Winograd's F(2x2, 3x3) reach the same validation mIoU? The
default synthetic recipe (`seglab train`: the main job's U-Net, 3,000 shapes at 64 x 64,
12 epochs) trained from the same seeds three ways:

- `forced`: bf16 with F(2x2) on every 3x3 convolution Winograd can take, whatever its width
  and tile count (the shipped rule, `seglab.engine.winograd.bf16_pays`, routes none of this
  narrow U-Net's: at least 256 channels over 512 tiles) - a harsher exposure than any real
  route, and the only one a converged run on this CPU can afford;
- `bf16`: the bf16 fast path with PyTorch's norms (`--no-native-norms`; autocast's direct
  convolutions here);
- `bf16-native-norms`: the same with the native norms (`seglab.engine.norms`), as shipped
  since the twenty-ninth session, and PyTorch's attention (`--no-native-attention`);
- `bf16-native-attention`: that with SegFormer's attention heads by the native kernel and
  its own backward too (`seglab.engine.attention`; for `-- --model segformer`), as shipped
  in the thirty-second session, with PyTorch's Mix-FFN operators (`--no-native-mix-ffn`);
- `bf16-native-mix-ffn`: that with the Mix-FFN's depthwise convolution and GELU by one
  native kernel each way too (`seglab.engine.mix_ffn`), as shipped since the thirty-third;
- `32`: float32.

Not a test: it prints a Markdown table of best validation mIoU per seed and the paired
differences (mean and standard error). Two runs at a time, one thread each.

    python benchmarks/f2x2_training_accuracy.py --seeds 0,1,2,3,4 --out runs/f2x2
    python benchmarks/f2x2_training_accuracy.py --seeds 0 --routes forced,bf16 -- --epochs 2
    python benchmarks/f2x2_training_accuracy.py --seeds 40,41 --routes bf16-native-attention,bf16-native-norms \
        -- --model segformer --epochs 8

Arguments after `--` go to every `seglab train` call.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROUTES = {"forced": ["--precision", "bf16", "--no-native-norms"],
          "bf16": ["--precision", "bf16", "--no-native-norms"],
          "32": ["--precision", "32"],
          "bf16-native-norms": ["--precision", "bf16", "--native-norms", "--no-native-attention"],
          "bf16-native-attention": ["--precision", "bf16", "--native-norms", "--native-attention",
                                    "--no-native-mix-ffn"],
          "bf16-native-mix-ffn": ["--precision", "bf16", "--native-norms", "--native-attention", "--native-mix-ffn"]}


def _one_run(route: str, train_args: list[str]) -> int:
    """`seglab train` in this process, F(2x2) forced first for the `forced` route; prints the
    number of F(2x2) calls (forward) at exit."""
    import seglab.engine.convolutions as convolutions
    import seglab.engine.winograd as winograd
    from seglab.cli import main

    if route == "forced":
        convolutions.min_channels = lambda training: 1  # every 3x3 convolution gets the route...
        winograd.bf16_pays = lambda *args, **kwargs: True  # ...and F(2x2) at every call
    calls = 0
    autocast_winograd = convolutions._autocast_winograd

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return autocast_winograd(*args, **kwargs)

    convolutions._autocast_winograd = counted
    status = main(["train", *ROUTES[route], *train_args])
    print(f"F(2x2) calls: {calls}", flush=True)
    return status


def _best_miou(run: Path) -> float | None:
    """The validation mIoU of the run's best checkpoint (as the trainer chose it); None where the
    run saved none."""
    from seglab.engine.checkpoint import read_checkpoint_config

    try:
        return float(read_checkpoint_config(run)["metrics"]["miou"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)  # --seed is train's
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--routes", default="forced,bf16,32", help=f"comma-separated, of {', '.join(ROUTES)}")
    parser.add_argument("--out", default="runs/f2x2-accuracy", help="folder of the runs (kept, with their metrics)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--one-run", choices=list(ROUTES), help=argparse.SUPPRESS)
    args, train_args = parser.parse_known_args()
    train_args = [a for a in train_args if a != "--"]
    if args.one_run:
        return _one_run(args.one_run, [*train_args, "--out", args.out])

    routes = args.routes.split(",")
    if unknown := [r for r in routes if r not in ROUTES]:
        parser.error(f"--routes: unknown {', '.join(unknown)}; known: {', '.join(ROUTES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: comma-separated whole numbers, not {args.seeds!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(route, seed) for seed in seeds for route in routes]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: dict[str, subprocess.Popen] = {}
    failures = []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            route, seed = jobs.pop(0)
            name = f"{route}-seed{seed}"
            command = [sys.executable, __file__, "--one-run", route, "--seed", str(seed), "--out", str(out),
                       "--name", name, *train_args]
            with open(out / f"{name}.log", "w") as log:
                running[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        time.sleep(1)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode != 0:
                    failures.append(name)

    best = {(route, seed): _best_miou(out / f"{route}-seed{seed}") for seed in seeds for route in routes}
    print("| seed | " + " | ".join(f"{r} best mIoU" for r in routes) + " |")
    print("|---" * (len(routes) + 1) + "|")
    for seed in seeds:
        print(f"| {seed} | " + " | ".join("-" if best[r, seed] is None else f"{best[r, seed]:.4f}" for r in routes) + " |")
    for first, second in [(a, b) for i, a in enumerate(routes) for b in routes[i + 1:]]:
        differences = [100 * (best[first, s] - best[second, s]) for s in seeds
                       if best[first, s] is not None and best[second, s] is not None]
        if differences:
            error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
            print(f"\n{first} - {second}: " + ", ".join(f"{d:+.2f}" for d in differences)
                  + f" points; mean {statistics.mean(differences):+.2f}, standard error {error:.2f}")
    if failures:
        print(f"\nfailed runs (see their logs in {out}): {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
