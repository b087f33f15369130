"""Dense CRF speed and agreement: seglab.crf.DenseCRF vs pydensecrf (Krähenbühl's C++).

    python benchmarks/crf.py                      # 160x120 .. 1280x960, 21 labels, 5 iterations
    python benchmarks/crf.py --sizes 320x240 --repeats 7 --threads 1

Kernels as in the issue: appearance sxy=80, srgb=13, compat=10; smoothness sxy=3, compat=3.
The image is a CamVid frame (../shared/data, resized) when present, else a synthetic scene;
the unaries are noisy softmax scores over 21 labels. Each timing is the best of `--repeats`
runs, seglab and pydensecrf interleaved so that both see the same machine load; both include
building the lattices from the image, except that seglab caches the smoothness kernel, which
depends only on the image size (the "new size" column clears that cache first). Wall-clock and process CPU time are both reported: on a
shared machine CPU time is the steadier figure (it sums threads when torch uses several).
Agreement is the share of pixels with the same argmax.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from seglab.crf import DenseCRF
from seglab.crf.kernels import _smoothness_kernel

KERNELS = {"theta_alpha": 80.0, "theta_beta": 13.0, "w1": 10.0, "theta_gamma": 3.0, "w2": 3.0}
CAMVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid" / "train"


def test_image(width: int, height: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    frames = sorted(CAMVID.glob("*.png")) if CAMVID.is_dir() else []
    if frames:
        from PIL import Image

        frame = Image.open(frames[0]).convert("RGB").resize((width, height), Image.BILINEAR)
        return np.array(frame), f"CamVid {frames[0].name}"
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx // 40 + yy // 40) % 2) * 200], -1)
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8), "synthetic"


def noisy_probabilities(k: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(0, 1, (k, height, width)).astype(np.float32)
    logits[(np.arange(width)[None, :] * k // width).repeat(height, 0), np.arange(height)[:, None], np.arange(width)[None, :]] += 1.5
    p = np.exp(logits)
    return (p / p.sum(0, keepdims=True)).astype(np.float32)


def run_pydensecrf(densecrf, image: np.ndarray, probabilities: np.ndarray, iterations: int) -> np.ndarray:
    k, h, w = probabilities.shape
    crf = densecrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probabilities, 1e-5, 1)).reshape(k, -1)))
    crf.addPairwiseGaussian(sxy=KERNELS["theta_gamma"], compat=KERNELS["w2"])
    crf.addPairwiseBilateral(sxy=KERNELS["theta_alpha"], srgb=KERNELS["theta_beta"], rgbim=image, compat=KERNELS["w1"])
    return np.array(crf.inference(iterations)).reshape(k, h, w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="160x120,320x240,640x480,1280x960", help="WxH list")
    parser.add_argument("--labels", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from pydensecrf import densecrf
    except ImportError:
        densecrf = None
        print("pydensecrf is not installed (pip install pydensecrf2): timing seglab alone")

    crf = DenseCRF(**KERNELS, iterations=args.iterations)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.labels} labels, {args.iterations} iterations")
    print(
        "| size | pixels | seglab wall (s) | pydensecrf wall (s) | speed-up | seglab wall, new size (s) "
        "| seglab CPU (s) | pydensecrf CPU (s) | label agreement |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    seglab_times = {}
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        image, source = test_image(width, height, rng)
        probabilities = noisy_probabilities(args.labels, height, width, rng)
        image_t, scores_t = torch.from_numpy(image), torch.from_numpy(probabilities)[None]
        repeats = max(1, args.repeats if width * height <= 640 * 480 else args.repeats // 2)
        ours, ours_cold, theirs, ours_cpu, theirs_cpu = [], [], [], [], []
        with torch.inference_mode():
            crf(image_t, scores_t)  # warm-up (allocator, MKL handles)
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                refined = crf(image_t, scores_t)[0].numpy()
                ours.append(time.perf_counter() - start)
                ours_cpu.append(time.process_time() - start_cpu)
                _smoothness_kernel.cache_clear()  # as for the first image of a new size
                start = time.perf_counter()
                crf(image_t, scores_t)
                ours_cold.append(time.perf_counter() - start)
                if densecrf is not None:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    expected = run_pydensecrf(densecrf, image, probabilities, args.iterations)
                    theirs.append(time.perf_counter() - start)
                    theirs_cpu.append(time.process_time() - start_cpu)
        seglab_times[width * height] = min(ours)
        if densecrf is not None:
            agreement = float((refined.argmax(0) == expected.argmax(0)).mean())
            print(
                f"| {width}x{height} | {width * height} | {min(ours):.3f} | {min(theirs):.3f} | "
                f"{min(theirs) / min(ours):.2f}x | {min(ours_cold):.3f} | {min(ours_cpu):.3f} | {min(theirs_cpu):.3f} "
                f"| {100 * agreement:.2f}% |"
            )
        else:
            print(f"| {width}x{height} | {width * height} | {min(ours):.3f} | - | - | {min(ours_cold):.3f} | {min(ours_cpu):.3f} | - | - |")
    print(f"image: {source}; best of {args.repeats} runs (sizes above 640x480: half as many)")
    pixels = sorted(seglab_times)
    for small, large in itertools.pairwise(pixels):
        if large == 4 * small:
            ratio = seglab_times[large] / seglab_times[small]
            print(f"linear scaling {small} -> {large} pixels (4x): time x{ratio:.2f} ({'ok' if ratio <= 4.5 else 'above 4.5'})")


if __name__ == "__main__":
    main()
