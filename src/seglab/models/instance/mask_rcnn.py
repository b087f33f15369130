"""Mask R-CNN (He, Gkioxari, Dollár, Girshick, ICCV 2017) on any seglab encoder.

The paper's figure, box by box, and where each box lives here:

1. backbone: a seglab encoder with a feature pyramid, P2..P5 plus a max-pooled P6
   (:class:`~seglab.models.instance.backbone.EncoderFPN`);
2. region proposal network (Ren et al. 2015): one 3x3 conv head shared by all pyramid levels,
   three aspect ratios per level, anchor side doubling per level from ``anchor_size``;
3. RoIAlign (bilinear sampling, no quantisation): each proposal is read from the pyramid level
   its size belongs to (FPN's k = 4 + log2(sqrt(wh)/224)); seglab's
   :class:`~seglab.ops.roi_align.SampledMultiScaleRoIAlign` computes torchvision's numbers as
   one sparse product per level, whose backward pass is several times faster on the CPU;
4. box head: two fully connected layers, per-class box refinement and softmax classification;
5. mask head: four 3x3 convs on 14x14 RoI features, a 2x transposed conv and a 1x1 conv giving
   one 28x28 mask per class; the loss is a per-pixel sigmoid BCE on the ground-truth class's mask
   only, so classes do not compete for pixels (the paper's decoupling of mask and class).

torchvision's detection module provides these parts and the two-stage plumbing (anchor
matching, sampling, losses, post-processing); this file wires them onto seglab encoders with
sizes that suit small images. The keypoint variant (section 5 of the paper) swaps the mask head
for one predicting K 56x56 heat maps, one per keypoint, trained with a softmax over the map.

Images go in unnormalised in [0, 1]; the model resizes (``min_size``/``max_size``; ``min_size=0``
keeps every image at its own size) and normalises internally, as torchvision's detectors do.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import KeypointRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import (
    KeypointRCNNHeads,
    KeypointRCNNPredictor,
)
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from seglab.encoders import read_state_dict
from seglab.models.instance.backbone import EncoderFPN, encoder_fpn
from seglab.models.registry import register_model
from seglab.ops.roi_align import SampledMultiScaleRoIAlign

__all__ = [
    "ContiguousKeypointPredictor", "Float32BoxPredictor", "Float32RPNHead", "NativeSizeTransform", "keypoint_rcnn", "load_torchvision_weights", "mask_rcnn",
    "normalisation", "pyramid_anchors",
]

_PYRAMID_LEVELS = ("0", "1", "2", "3")  # P2..P5; RoIs are pooled from these, never from P6
_ASPECT_RATIOS = (0.5, 1.0, 2.0)

# Why float32 box deltas: torchvision's BoxCoder casts the reference boxes (anchors, proposals)
# to the deltas' dtype before decoding. Under bf16 autocast the heads' deltas are bf16, so every
# proposal and detected box would carry 8 significant bits: coordinates in steps of 0.5 px from
# 64 px on, 2 px from 256 px on. Casting the deltas (relative offsets, where 8 bits cost a small
# fraction of a pixel) back to float32 keeps box arithmetic exact; the heads still run in bf16.


class Float32RPNHead(RPNHead):
    """torchvision's RPN head (3x3 conv, objectness and box-delta 1x1 convs) with float32 outputs."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32BoxPredictor(FastRCNNPredictor):
    """torchvision's box predictor (class scores, per-class box deltas) with float32 outputs."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class ContiguousKeypointPredictor(KeypointRCNNPredictor):
    """torchvision's keypoint predictor (transposed conv, 2x bilinear upsampling to 56x56) with
    heat maps in the standard layout: torchvision's keypoint loss reshapes them with ``view``,
    which a channels_last model's maps (seglab's fast path) cannot take."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous()


# The tensors whose shape follows the number of classes (or keypoints): kept from the seglab
# model when a torchvision checkpoint was trained on another count (fine-tuning from COCO's 91).
_CLASS_SPECIFIC = (
    "roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.", "roi_heads.mask_predictor.mask_fcn_logits.",
    "roi_heads.keypoint_predictor.kps_score_lowres.",
)


def load_torchvision_weights(model: nn.Module, weights: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load torchvision Mask R-CNN weights (``maskrcnn_resnet50_fpn``'s state dict, or a local file
    of it such as its COCO checkpoint) into a seglab :func:`mask_rcnn` with ``encoder="resnet50"``;
    likewise ``keypointrcnn_resnet50_fpn``'s into :func:`keypoint_rcnn`.

    The two share every part but the backbone's container: torchvision's ResNet-50 body and the
    timm ResNet-50 encoder have the same layers under other names (``backbone.body.`` here is
    ``backbone.encoder.model.``), and FrozenBatchNorm2d stores no batch counter. The
    class-specific predictors are kept from ``model`` when their shapes differ (a checkpoint of
    another class count: fine-tuning); their names are returned. Any other missing or misshaped
    tensor is an error naming it.
    """
    source = "torchvision weights" if isinstance(weights, Mapping) else f"torchvision weights file {str(weights)!r}"
    state = dict(weights) if isinstance(weights, Mapping) else read_state_dict(weights, "torchvision weights file")
    state = {key.replace("backbone.body.", "backbone.encoder.model.", 1): value for key, value in state.items()}
    own = model.state_dict()
    needs = "(they fit a Mask R-CNN with encoder resnet50 and the default widths)"
    kept: list[str] = []
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
        elif key not in state:
            raise ValueError(f"{source} lack {key} {needs}")
        elif state[key].shape != value.shape:
            if not key.startswith(_CLASS_SPECIFIC):
                raise ValueError(f"{source} have {key} of shape {tuple(state[key].shape)}, not {tuple(value.shape)} {needs}")
            state[key] = value
            kept.append(key)
    model.load_state_dict({key: state[key] for key in own})
    return kept


class NativeSizeTransform(GeneralizedRCNNTransform):
    """Normalise and batch (padded to a multiple of 32) without resizing: the data pipeline owns the scale.

    Small objects (nuclei, the synthetic shapes) lose nothing to an upscaling they do not
    need, and training crops and full-size evaluation images are seen at the same scale.
    """

    def resize(self, image, target=None):
        return image, target


def pyramid_anchors(anchor_size: int, num_levels: int = 5) -> AnchorGenerator:
    """One anchor size per level (doubling from P2), three aspect ratios (1:2, 1:1, 2:1) each."""
    sizes = tuple((anchor_size * 2**level,) for level in range(num_levels))
    return AnchorGenerator(sizes, (_ASPECT_RATIOS,) * num_levels)


def normalisation(in_channels: int) -> tuple[list[float], list[float]]:
    """ImageNet statistics for RGB (what timm encoders expect), neutral ones otherwise."""
    if in_channels == 3:
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return [0.5] * in_channels, [0.25] * in_channels


def _finish(model: nn.Module, min_size: int, in_channels: int, torchvision_weights: str | None) -> nn.Module:
    if torchvision_weights:
        load_torchvision_weights(model, torchvision_weights)
    if min_size == 0:
        mean, std = normalisation(in_channels)
        model.transform = NativeSizeTransform(1, 1, mean, std)
    return model


def _two_stage_options(
    backbone: EncoderFPN, anchor_size: int, min_size: int, max_size: int, proposals: int, rois_per_image: int,
    detections_per_image: int, in_channels: int, box_head_width: int = 1024,
) -> dict:
    mean, std = normalisation(in_channels)
    return dict(
        min_size=min_size or 1,
        max_size=max_size,
        image_mean=mean,
        image_std=std,
        rpn_anchor_generator=pyramid_anchors(anchor_size),
        rpn_head=Float32RPNHead(backbone.out_channels, len(_ASPECT_RATIOS)),
        rpn_pre_nms_top_n_train=proposals * 2,
        rpn_post_nms_top_n_train=proposals * 2,
        rpn_pre_nms_top_n_test=proposals,
        rpn_post_nms_top_n_test=proposals,
        box_roi_pool=SampledMultiScaleRoIAlign(list(_PYRAMID_LEVELS), output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, box_head_width),
        box_batch_size_per_image=rois_per_image,
        box_detections_per_img=detections_per_image,
    )


@register_model("mask_rcnn", task="instance", paper="He et al. 2017, Mask R-CNN (ICCV)", zero_allowed=("min_size",))
def mask_rcnn(
    *,
    num_classes: int = 6,
    in_channels: int = 3,
    encoder: str = "resnet50",
    encoder_weights: str | None = None,
    fpn_channels: int = 256,
    anchor_size: int = 32,
    min_size: int = 800,
    max_size: int = 1333,
    proposals: int = 1000,
    rois_per_image: int = 512,
    detections_per_image: int = 100,
    box_head_width: int = 1024,
    mask_head_width: int = 256,
    torchvision_weights: str | None = None,
) -> nn.Module:
    """Mask R-CNN: RPN over FPN levels, RoIAlign, box head and a class-specific 28x28 mask head.

    Args:
        num_classes: object classes including background (label 0).
        encoder: any seglab encoder name, e.g. "resnet18", "resnet50".
        anchor_size: anchor side on P2 (32 in the paper for 800-pixel images); doubles per level.
        min_size, max_size: images are resized so the short side is ``min_size`` and the long
            side at most ``max_size`` (the paper's 800/1333); ``min_size=0`` keeps each image's size.
        proposals: RPN proposals kept per image after NMS at test time (twice that in training).
        rois_per_image: RoIs sampled per image for the box/mask losses (512 in the paper).
        detections_per_image: at most this many detections per image in eval mode.
        box_head_width: width of the box head's two fully connected layers (1024 in the paper).
        mask_head_width: channels of the mask head's four convs and transposed conv (256 in the
            paper); the mask head is most of the cost per RoI, so small-image CPU recipes narrow it.
        torchvision_weights: a local file of torchvision ``maskrcnn_resnet50_fpn`` weights (e.g.
            its COCO checkpoint) to start from; needs ``encoder="resnet50"`` and the default
            widths. The class-specific predictors start fresh when ``num_classes`` differs.
    """
    backbone = encoder_fpn(encoder, in_channels=in_channels, encoder_weights=encoder_weights, out_channels=fpn_channels, min_stride=4, extra="maxpool")
    options = _two_stage_options(
        backbone, anchor_size, min_size, max_size, proposals, rois_per_image, detections_per_image, in_channels, box_head_width
    )
    model = MaskRCNN(
        backbone,
        box_predictor=Float32BoxPredictor(box_head_width, num_classes),
        mask_roi_pool=SampledMultiScaleRoIAlign(list(_PYRAMID_LEVELS), output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(fpn_channels, [mask_head_width] * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_head_width, mask_head_width, num_classes),
        **options,
    )
    return _finish(model, min_size, in_channels, torchvision_weights)


@register_model("keypoint_rcnn", task="keypoint", paper="He et al. 2017, Mask R-CNN (ICCV), section 5", zero_allowed=("min_size",))
def keypoint_rcnn(
    *,
    num_classes: int = 2,
    num_keypoints: int = 17,
    in_channels: int = 3,
    encoder: str = "resnet50",
    encoder_weights: str | None = None,
    fpn_channels: int = 256,
    head_channels: int = 512,
    anchor_size: int = 32,
    min_size: int = 800,
    max_size: int = 1333,
    proposals: int = 1000,
    rois_per_image: int = 512,
    detections_per_image: int = 100,
    box_head_width: int = 1024,
    torchvision_weights: str | None = None,
) -> nn.Module:
    """Keypoint R-CNN: Mask R-CNN with a keypoint head, one 56x56 heat map per keypoint.

    Targets carry ``keypoints`` (N x K x 3: x, y, visibility); the head is eight 3x3 convs of
    ``head_channels`` on 14x14 RoI features and a 2x transposed conv, upsampled to 56x56, as the
    paper describes; the head runs on every detection, so its width is most of the cost per
    object. Other arguments as :func:`mask_rcnn`; ``torchvision_weights`` is a file of
    torchvision ``keypointrcnn_resnet50_fpn`` weights (its COCO person-keypoint checkpoint).
    """
    backbone = encoder_fpn(encoder, in_channels=in_channels, encoder_weights=encoder_weights, out_channels=fpn_channels, min_stride=4, extra="maxpool")
    options = _two_stage_options(
        backbone, anchor_size, min_size, max_size, proposals, rois_per_image, detections_per_image, in_channels, box_head_width
    )
    model = KeypointRCNN(
        backbone,
        box_predictor=Float32BoxPredictor(box_head_width, num_classes),
        keypoint_roi_pool=SampledMultiScaleRoIAlign(list(_PYRAMID_LEVELS), output_size=14, sampling_ratio=2),
        keypoint_head=KeypointRCNNHeads(fpn_channels, [head_channels] * 8),
        keypoint_predictor=ContiguousKeypointPredictor(head_channels, num_keypoints),
        **options,
    )
    return _finish(model, min_size, in_channels, torchvision_weights)
