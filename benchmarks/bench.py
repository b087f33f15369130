"""seglab against segmentation_models_pytorch and torchvision: the full comparison of the
README (docs/bench.md), written to benchmarks/results/bench/{bench.json,bench.md}.

    python benchmarks/bench.py                          # all 7 architectures, 512x512, batch 1 and 8
    python benchmarks/bench.py --models unet-r34 --size 256 --repeats 3   # any `seglab bench` option

It is `seglab bench` with the issue's settings as defaults (ablation rows for UNet-R34 and
the accuracy check on); options given here are passed on and win. Not a test.
"""
from __future__ import annotations

import sys
from pathlib import Path

from seglab.cli import main

DEFAULTS = ["--size", "512", "--batch", "1,8", "--train-batch", "8", "--repeats", "5", "--warmup", "1",
            "--ablation", "unet-r34", "--accuracy", "--out", str(Path(__file__).parent / "results" / "bench")]


if __name__ == "__main__":
    # argparse keeps the last value of a repeated option, so the user's options override the defaults.
    sys.exit(main(["bench", *DEFAULTS, *sys.argv[1:]]))
