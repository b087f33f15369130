"""Segmentation metrics, streaming (`update`, `compute`, `reset`) and usable on their own."""
from seglab.metrics.confusion import ConfusionMatrix

__all__ = ["ConfusionMatrix"]
