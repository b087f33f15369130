"""Segmentation losses: CE, BCE, focal, soft Dice / Jaccard (L1 and L2), Lovasz, Tversky, combos.

Modes and shapes (see seglab.losses._inputs): multiclass logits N x K x H x W with class-index
targets N x H x W; binary logits N x 1 x H x W with 0/1 targets; multilabel logits and 0/1
targets N x K x H x W. Every loss honours `ignore_index`. `build_loss("0.5*ce+dice", ...)`
builds any weighted combination from a string (grammar in seglab.losses.factory).
"""
from seglab.losses.factory import LOSS_NAMES, WeightedSum, build_loss, float32_logits_for, upcasts_itself
from seglab.losses.lovasz import LovaszHingeLoss, LovaszSoftmaxLoss
from seglab.losses.overlap import DiceLoss, JaccardLoss, TverskyLoss
from seglab.losses.pixelwise import BCELoss, CrossEntropyLoss, FocalLoss

__all__ = [
    "LOSS_NAMES",
    "BCELoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "JaccardLoss",
    "LovaszHingeLoss",
    "LovaszSoftmaxLoss",
    "TverskyLoss",
    "WeightedSum",
    "build_loss",
    "float32_logits_for",
    "upcasts_itself",
]
