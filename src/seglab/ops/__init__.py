"""Tensor-to-tensor building blocks; nothing here knows about models."""
from seglab.ops.conv import ConvNormAct

__all__ = ["ConvNormAct"]
