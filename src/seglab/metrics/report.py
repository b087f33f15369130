"""Printable and JSON forms of a metrics dict (what `seglab eval` shows and writes).

Both accept any dict produced by the metrics of this package, or several merged with
`{**a, **b}`: floats are summary figures, 1-D tensors of length K are per-class figures,
other tensors (the confusion matrix) are kept as nested lists in JSON and left out of the table.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from rich.table import Table

__all__ = ["format_report", "results_to_json"]

# Per-class keys in table order, their column titles, and the key of their macro mean.
_PER_CLASS = {
    "iou": ("IoU", "miou"),
    "dice": ("Dice", "mdice"),
    "accuracy": ("Acc", "mean_accuracy"),
    "precision": ("Prec", "mean_precision"),
    "boundary_iou": ("Boundary IoU", "mboundary_iou"),
    "soft_iou": ("Soft IoU", "msoft_iou"),
    "soft_dice": ("Soft Dice", "msoft_dice"),
    "ap": ("AP", "map"),
}
_MICRO = {"iou": "micro_iou", "dice": "micro_dice", "precision": "micro_precision", "accuracy": "micro_recall",
          "soft_iou": "micro_soft_iou", "soft_dice": "micro_soft_dice"}
_SKIPPED_IN_TABLE = {"recall", "support", "confusion_matrix"}  # recall duplicates Acc


def _text(value: Any, digits: int) -> str:
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _class_name(index: int, class_names: Sequence[str] | None) -> str:
    return escape(class_names[index]) if class_names is not None and index < len(class_names) else str(index)


def format_report(
    results: Mapping[str, Any],
    class_names: Sequence[str] | None = None,
    *,
    title: str = "Evaluation",
    digits: int = 4,
) -> Table:
    """A rich Table: one row per class (IoU, Dice, ... as present), macro/micro mean rows, then
    every scalar figure (pixel accuracy, fwIoU, COCO AP, ...). NaN (undefined) shows as n/a.

    Print it with `rich.console.Console().print(format_report(results, names))`.
    """
    columns = [k for k in _PER_CLASS if isinstance(results.get(k), torch.Tensor) and results[k].dim() == 1]
    shown_scalars: set[str] = set()
    table = Table(title=escape(title))
    if columns:
        table.add_column("Class")
        for key in columns:
            table.add_column(_PER_CLASS[key][0], justify="right")
        for index in range(len(results[columns[0]])):
            table.add_row(_class_name(index, class_names), *(_text(results[k][index], digits) for k in columns))
        table.add_section()
        mean_keys = [_PER_CLASS[k][1] for k in columns]
        table.add_row("mean", *(_text(results[m], digits) if m in results else "" for m in mean_keys))
        shown_scalars.update(m for m in mean_keys if m)
        micro_keys = [_MICRO.get(k) for k in columns]
        if any(m in results for m in micro_keys if m):
            table.add_row("micro", *(_text(results[m], digits) if m in results else "" for m in micro_keys))
            shown_scalars.update(m for m in micro_keys if m)
        table.add_section()
    else:
        table.add_column("Metric")
        table.add_column("Value", justify="right")
    padding = [""] * max(0, len(columns) - 1)
    for key, value in results.items():
        if key in shown_scalars or key in _SKIPPED_IN_TABLE or key in _PER_CLASS:
            continue
        if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.dim() == 0):
            table.add_row(key, _text(value, digits), *padding)
        elif isinstance(value, Mapping):  # e.g. COCO's ap_per_class
            for name, item in value.items():
                table.add_row(escape(f"{key}[{name}]"), _text(item, digits), *padding)
    return table


def _jsonable(value: Any, class_names: Sequence[str] | None) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() == 1 and class_names is not None and len(value) == len(class_names):
            return {name: _jsonable(item, None) for name, item in zip(class_names, value.tolist())}
        return _jsonable(value.tolist(), None)
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value  # JSON has no NaN
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, class_names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, None) for v in value]
    return value


def results_to_json(
    results: Mapping[str, Any],
    path: str | Path | None = None,
    *,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A JSON-ready copy of `results`, written to `path` (indented) when given.

    Per-class tensors become {class name: value} when `class_names` matches their length, else
    lists; the confusion matrix a nested list; NaN becomes null (JSON has no NaN).
    """
    document = {str(k): _jsonable(v, class_names) for k, v in results.items()}
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n")
    return document
