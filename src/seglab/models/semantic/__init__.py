"""Semantic segmentation architectures, one file each; importing registers them."""
from seglab.models.semantic import (  # noqa: F401
    deconvnet,
    deeplab,
    fcn,
    fpn,
    hourglass,
    hrnet,
    pspnet,
    segformer,
    segnet,
    unet,
)
