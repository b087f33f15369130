"""Tensor-to-tensor building blocks; nothing here knows about models."""
from seglab.ops.context import ASPP, PyramidPooling
from seglab.ops.conv import ConvNormAct, SeparableConvNormAct, atrous_conv, norm_layer
from seglab.ops.padding import crop_to, pad_to_multiple
from seglab.ops.upsample import UPSAMPLE_KINDS, Upsample, bilinear_kernel, make_upsample

__all__ = [
    "ASPP",
    "ConvNormAct",
    "PyramidPooling",
    "SeparableConvNormAct",
    "UPSAMPLE_KINDS",
    "Upsample",
    "atrous_conv",
    "bilinear_kernel",
    "crop_to",
    "make_upsample",
    "norm_layer",
    "pad_to_multiple",
]
