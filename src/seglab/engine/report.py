"""Tables of results for the terminal."""
from __future__ import annotations

import math
from typing import Any, Sequence

from rich.table import Table

__all__ = ["metrics_table"]


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def metrics_table(results: dict[str, Any], classes: Sequence[str], title: str = "Validation") -> Table:
    """Per-class IoU / Dice / accuracy, then the summary rows."""
    table = Table(title=title)
    table.add_column("class")
    for column in ("IoU", "Dice", "accuracy"):
        table.add_column(column, justify="right")
    for index, name in enumerate(classes):
        table.add_row(name, _fmt(float(results["iou"][index])), _fmt(float(results["dice"][index])), _fmt(float(results["accuracy"][index])))
    table.add_section()
    table.add_row("[bold]mean[/]", f"[bold]{_fmt(results['miou'])}[/]", _fmt(results["mdice"]), _fmt(results["mean_accuracy"]))
    table.add_row("pixel accuracy", _fmt(results["pixel_accuracy"]), "", "")
    table.add_row("frequency-weighted IoU", _fmt(results["fwiou"]), "", "")
    return table
