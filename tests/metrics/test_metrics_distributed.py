"""Every metric reduces across processes: two gloo processes, each given half of the data,
compute() on both ranks the figures one process computes on all of it (float32 softmax may
differ by an ulp with the thread count, hence the 1e-6 tolerance; counts must match exactly
within it too)."""
import math

import torch
import torch.multiprocessing as mp

from seglab.metrics import (
    AveragePrecision,
    BoundaryIoU,
    COCOMaskEvaluator,
    ConfusionMatrix,
    SoftOverlap,
)


def _data():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 12, 12, generator=g)
    target = torch.randint(0, 3, (2, 12, 12), generator=g)
    target[1, :2] = 255
    instance_masks = torch.zeros(2, 2, 12, 12, dtype=torch.uint8)
    instance_masks[:, 0, 1:6, 1:6] = 1
    instance_masks[:, 1, 6:11, 4:10] = 1
    return logits, target, instance_masks


def _metrics():
    return {
        "confusion": ConfusionMatrix(3),
        "soft": SoftOverlap(3, from_logits=True),
        "ap_exact": AveragePrecision(3, task="multiclass"),
        "ap_binned": AveragePrecision(3, task="multiclass", thresholds=11),
        "boundary": BoundaryIoU(3, dilation_ratio=0.1),
    }


def _update(metrics, coco, logits, target, instance_masks, images):
    for i in images:
        for name, metric in metrics.items():
            metric.update(logits[i : i + 1].softmax(1) if name.startswith("ap") else logits[i : i + 1], target[i : i + 1])
        shifted = torch.roll(instance_masks[i], 1, dims=2).float()
        coco.update([{"masks": shifted, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.4])}],
                    [{"masks": instance_masks[i], "labels": torch.tensor([1, 2])}])


def _flatten(results):
    values = []
    for value in results.values():
        if isinstance(value, torch.Tensor):
            values += value.double().flatten().tolist()
        elif isinstance(value, float):
            values.append(value)
    return values


def _worker(rank, folder):
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        metrics, coco = _metrics(), COCOMaskEvaluator()
        _update(metrics, coco, *_data(), images=[rank])
        results = {name: _flatten(metric.compute()) for name, metric in metrics.items()}
        results["coco"] = _flatten(coco.compute())
        torch.save(results, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    # fork, not spawn: the children reuse the imported torch instead of importing it again.
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")
    metrics, coco = _metrics(), COCOMaskEvaluator()
    _update(metrics, coco, *_data(), images=[0, 1])
    expected = {name: _flatten(metric.compute()) for name, metric in metrics.items()}
    expected["coco"] = _flatten(coco.compute())
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for name, values in expected.items():
            assert len(got[name]) == len(values), name
            for a, b in zip(got[name], values):
                assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), name
