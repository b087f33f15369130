"""format_report (rich table) and results_to_json (what `seglab eval` prints and writes)."""
import json
import math

import torch
from rich.console import Console

from seglab.metrics import (
    BoundaryIoU,
    COCOMaskEvaluator,
    ConfusionMatrix,
    format_report,
    results_to_json,
)


def _render(table) -> str:
    console = Console(width=160, record=True)
    console.print(table)
    return console.export_text()


def _semantic_results():
    cm, boundary = ConfusionMatrix(3), BoundaryIoU(3)
    pred = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]])
    target = torch.tensor([[[0, 0, 1, 0], [0, 0, 1, 255]]])
    cm.update(pred, target)
    boundary.update(pred, target)
    return {**cm.compute(), **boundary.compute()}


def test_table_has_a_row_per_class_means_and_scalars():
    results = _semantic_results()
    text = _render(format_report(results, ["sky", "road", "car"], title="val"))
    assert "val" in text and "sky" in text and "road" in text and "car" in text
    car_row = next(line for line in text.splitlines() if "car" in line)
    assert "n/a" in car_row  # class 2 is absent from prediction and target: NaN is shown as n/a
    assert f"{results['miou']:.4f}" in next(line for line in text.splitlines() if line.strip("│ ").startswith("mean"))
    assert "pixel_accuracy" in text and f"{results['pixel_accuracy']:.4f}" in text
    assert "Boundary IoU" in text


def test_instance_results_table():
    masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    masks[0, 2:9, 2:9] = 1
    evaluator = COCOMaskEvaluator(categories={1: "cell"})
    evaluator.update([{"masks": masks, "labels": torch.tensor([1]), "scores": torch.tensor([0.5])}], [{"masks": masks, "labels": torch.tensor([1])}])
    text = _render(format_report(evaluator.compute(), title="instances"))
    assert "boundary_ap" in text and "ap_per_class[cell]" in text and "1.0000" in text


def test_json_dump_names_classes_and_writes_null_for_nan(tmp_path):
    results = _semantic_results()
    document = results_to_json(results, tmp_path / "out" / "metrics.json", class_names=["sky", "road", "car"])
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == document
    assert on_disk["iou"]["car"] is None and math.isclose(on_disk["iou"]["sky"], float(results["iou"][0]))
    assert on_disk["confusion_matrix"] == results["confusion_matrix"].tolist()
    assert math.isclose(on_disk["miou"], results["miou"])
    assert results_to_json({"iou": torch.tensor([0.5, float("nan")])}) == {"iou": [0.5, None]}
