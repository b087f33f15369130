"""Semantic segmentation architectures, one file each; importing registers them."""
from seglab.models.semantic import unet  # noqa: F401
