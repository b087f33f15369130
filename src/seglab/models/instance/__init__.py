"""Instance segmentation architectures; importing registers them."""
from seglab.models.instance import mask_rcnn, yolact  # noqa: F401
