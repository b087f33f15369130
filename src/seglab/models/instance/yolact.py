"""YOLACT: Real-time Instance Segmentation (Bolya, Zhou, Xiao, Lee, ICCV 2019).

One stage, two parallel branches, then a linear combination (the paper's figure 2):

1. backbone: a seglab encoder with a feature pyramid P3..P7 (P6, P7 by stride-2 convs);
2. ProtoNet: on P3, three 3x3 convs, 2x upsampling, a 3x3 conv and a 1x1 conv to ``k``
   prototype masks (ReLU, stride 4), shared by all instances of the image;
3. prediction head: shared across levels; per anchor 4 box offsets, C class scores and ``k``
   mask coefficients in [-1, 1] (tanh);
4. Fast NMS: per class, IoU matrix of the top detections, upper triangle, column max; a
   detection is dropped when any higher-scored one overlaps it, even if that one is dropped too;
5. assembly: masks = sigmoid(P . c), cropped to the box (zero outside it), thresholded at 0.5.

Losses: softmax classification with online hard negative mining (3 negatives per positive) or
sigmoid focal loss; smooth-L1 on SSD-encoded box offsets; per-pixel BCE between assembled masks
and ground truth at prototype resolution, cropped by the ground-truth box and normalised by the
box's area, so small objects weigh as much as large ones.

Images go in unnormalised in [0, 1] as a list (any sizes); the model normalises them, pads the
batch to a multiple of 32 and returns predictions in each image's own coordinates.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, sigmoid_focal_loss

from seglab.models.instance.backbone import encoder_fpn
from seglab.models.instance.mask_rcnn import normalisation
from seglab.models.registry import register_model
from seglab.ops.tracing import being_traced

__all__ = ["PredictionHead", "ProtoNet", "Yolact", "crop_masks", "decode_boxes", "encode_boxes", "fast_nms", "upsample_in_boxes", "yolact"]

_BOX_VARIANCES = (0.1, 0.2)  # SSD's scaling of centre and log-size offsets
_SIZE_DIVISOR = 32


# --- the parts of the figure ---------------------------------------------------------------


class ProtoNet(nn.Module):
    """P3 -> ``k`` prototype masks at twice P3's resolution (the paper's figure 3)."""

    def __init__(self, in_channels: int, num_prototypes: int, width: int = 256) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]

        self.before_upsampling = nn.Sequential(*conv(in_channels, width), *conv(width, width), *conv(width, width))
        self.after_upsampling = nn.Sequential(*conv(width, width), nn.Conv2d(width, num_prototypes, 1), nn.ReLU(inplace=True))

    def forward(self, p3: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.before_upsampling(p3), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.after_upsampling(x)


class PredictionHead(nn.Module):
    """The head shared by all levels: a 3x3 conv, then three 3x3 convs for boxes, classes and coefficients."""

    def __init__(self, in_channels: int, num_classes: int, num_prototypes: int, anchors_per_cell: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_prototypes = num_prototypes
        self.shared = nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
        self.box = nn.Conv2d(in_channels, anchors_per_cell * 4, 3, padding=1)
        self.score = nn.Conv2d(in_channels, anchors_per_cell * num_classes, 3, padding=1)
        self.coefficient = nn.Conv2d(in_channels, anchors_per_cell * num_prototypes, 3, padding=1)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.shared(feature)
        batch = x.shape[0]

        def per_anchor(t: torch.Tensor, width: int) -> torch.Tensor:  # N x (A*w) x H x W -> N x (H*W*A) x w
            return t.permute(0, 2, 3, 1).reshape(batch, -1, width)

        return (
            per_anchor(self.box(x), 4),
            per_anchor(self.score(x), self.num_classes),
            torch.tanh(per_anchor(self.coefficient(x), self.num_prototypes)),
        )


# --- box arithmetic, mask crop and Fast NMS --------------------------------------------------


def _centre_size(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """XYXY boxes -> SSD offsets (dx, dy, dw, dh) relative to XYXY anchors."""
    b, a = _centre_size(boxes), _centre_size(anchors)
    centre = (b[:, :2] - a[:, :2]) / (a[:, 2:] * _BOX_VARIANCES[0])
    size = torch.log(b[:, 2:].clamp(min=1e-3) / a[:, 2:]) / _BOX_VARIANCES[1]
    return torch.cat([centre, size], 1)


def decode_boxes(offsets: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes`; offsets may carry leading batch dimensions."""
    a = _centre_size(anchors)
    centre = a[:, :2] + offsets[..., :2] * _BOX_VARIANCES[0] * a[:, 2:]
    size = a[:, 2:] * torch.exp((offsets[..., 2:] * _BOX_VARIANCES[1]).clamp(max=math.log(1000.0 / 16)))
    return torch.cat([centre - size / 2, centre + size / 2], -1)


def crop_masks(masks: torch.Tensor, boxes: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """Zero every mask (N x H x W) outside its box (N x 4, XYXY in the masks' pixel units).

    A pixel (column j, row i) is inside when its centre (j + 0.5, i + 0.5) lies within the box,
    so box [1, 1, 3, 3] keeps exactly pixels 1 and 2 in each direction. A box is a row range
    times a column range, so the masks are multiplied by an N x H x 1 and an N x 1 x W factor:
    no N x H x W comparison is built. ``in_place`` multiplies ``masks`` itself (inference,
    where 100 detections on a 512-pixel image are 105 MB that a copy would fault in anew).
    """
    inside_rows, inside_cols = _centres_in_boxes(boxes, *masks.shape[-2:])
    in_rows = inside_rows[:, :, None].to(masks.dtype)
    in_cols = inside_cols[:, None, :].to(masks.dtype)
    if in_place:
        return masks.mul_(in_rows).mul_(in_cols)
    return masks * in_rows * in_cols


def _centres_in_boxes(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per box (N x 4, XYXY), which rows (N x H) and columns (N x W) of an H x W map have their
    pixel centres (i + 0.5) within it: the rule `crop_masks` and `upsample_in_boxes` share."""
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5
    return (rows >= boxes[:, 1:2]) & (rows <= boxes[:, 3:4]), (cols >= boxes[:, 0:1]) & (cols <= boxes[:, 2:3])


def _bilinear_taps(out_size: int, in_size: int, count: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For output pixels 0..count-1 of a bilinear resize from `in_size` to `out_size` (half-pixel
    centres, `align_corners=False`, as F.interpolate computes it): the two source pixels each
    reads and the second one's weight."""
    source = ((torch.arange(count, dtype=torch.float32, device=device) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    first = source.floor().long().clamp(max=in_size - 1)
    return first, (first + 1).clamp(max=in_size - 1), (source - first).clamp(0, 1)


def _box_spans(inside: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per row of an N x L boolean table, the first True index and one past the last (0, 0
    where none is)."""
    present = inside.any(1)
    first = inside.int().argmax(1)
    end = inside.shape[1] - inside.flip(1).int().argmax(1)
    return torch.where(present, first, 0).tolist(), torch.where(present, end, 0).tolist()


# Images from this many pixels upsample their masks only inside the boxes: its loop costs about
# 40 us per detection, which the whole-image kernel's work outweighs from about 224 x 224 pixels
# (100 masks: 4.4 -> 5.7 ms at 192 x 192, 7.5 -> 6.0 at 256 x 256, 32 -> 14 at 512 x 512; Zen 4).
_BOXWISE_FROM_PIXELS = 256 * 256


def upsample_in_boxes(masks: torch.Tensor, boxes: torch.Tensor, padded_size: tuple[int, int],
                      image_size: tuple[int, int]) -> torch.Tensor:
    """``crop_masks(F.interpolate(masks, padded_size, bilinear)[..., :H, :W], boxes)`` for N x h x w
    masks, computed only inside each box: N x H x W, zero outside the boxes.

    Step 5 of the figure upsamples every mask to the whole image and then zeroes all of it but
    its box; here each box's pixels read their two rows and two columns of the small mask
    (the same taps and weights as PyTorch's kernel, in float32) and nothing else is computed.
    A box keeps the pixels whose centres it holds, as in `crop_masks`. 100 masks from 128 to 512
    pixels: 32 -> 14 ms in float32, 68 -> 9 ms for bf16 masks, whose upsampling PyTorch runs
    slowly (2-core Zen 4)."""
    height, width = image_size
    out = masks.new_zeros(masks.shape[0], height, width)
    row_first, row_second, row_weight = _bilinear_taps(padded_size[0], masks.shape[1], height, masks.device)
    col_first, col_second, col_weight = _bilinear_taps(padded_size[1], masks.shape[2], width, masks.device)
    row_weight = row_weight[:, None]
    inside_rows, inside_cols = _centres_in_boxes(boxes, height, width)
    (top, bottom), (left, right) = _box_spans(inside_rows), _box_spans(inside_cols)
    for k, (y0, y1, x0, x1) in enumerate(zip(top, bottom, left, right)):
        if y1 <= y0 or x1 <= x0:
            continue
        first, second = col_first[x0:x1], col_second[x0:x1]
        start = int(first[0])  # the box's columns of the small mask, start .. second[-1]
        part = masks[k, :, start: int(second[-1]) + 1].float()
        upper, lower = part.index_select(0, row_first[y0:y1]), part.index_select(0, row_second[y0:y1])
        vertical = upper + (lower - upper) * row_weight[y0:y1]
        west, east = vertical.index_select(1, first - start), vertical.index_select(1, second - start)
        out[k, y0:y1, x0:x1] = west + (east - west) * col_weight[x0:x1]
    return out


def fast_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5, top_k: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast NMS (YOLACT section 3.4), all classes at once.

    Args:
        boxes: C x n x 4 candidate boxes per class (the same n candidates may repeat per class).
        scores: C x n scores.
    Returns:
        (class index, candidate index) of the kept detections. Per class, the ``top_k`` best
        candidates are sorted, their pairwise IoU's upper triangle (each box against the
        higher-scored ones) is max-reduced per column, and a box survives when that max is
        at most ``iou_threshold``. Unlike greedy NMS, a suppressed box still suppresses others,
        which the paper shows costs little accuracy and makes NMS one matrix operation.
    """
    # No branch on the candidate count: every step below holds for none as well, so that
    # torch.export can take the function whole (a count is data-dependent).
    scores, order = scores.sort(dim=1, descending=True)
    order = order[:, :top_k]
    ranked = torch.gather(boxes, 1, order.unsqueeze(-1).expand(-1, -1, 4))
    iou = torch.stack([box_iou(b, b) for b in ranked])  # C x n x n
    keep = ~(iou.triu(diagonal=1) > iou_threshold).any(dim=1)  # the column's max <= threshold
    classes = torch.arange(len(order), device=boxes.device).unsqueeze(1).expand_as(order)
    return classes[keep], order[keep]


# --- the model -------------------------------------------------------------------------------


class Yolact(nn.Module):
    """YOLACT on any seglab encoder; torchvision's instance model interface (see module docstring)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_prototypes: int = 32,
        proto_width: int = 256,
        anchor_size: int = 24,
        aspect_ratios: tuple[float, ...] = (1.0, 0.5, 2.0),
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        class_loss: str = "ohem",
        loss_weights: tuple[float, float, float] = (1.0, 1.5, 6.125),
        semantic_weight: float = 1.0,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        nms_top_k: int = 200,
        detections_per_image: int = 100,
        max_masks_per_image: int = 100,
    ) -> None:
        super().__init__()
        if class_loss not in ("ohem", "focal"):
            raise ValueError(f"class_loss must be 'ohem' or 'focal', not {class_loss!r}")
        if not semantic_weight >= 0:
            raise ValueError(f"semantic_weight must be >= 0 (0 leaves the semantic loss out), not {semantic_weight!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.anchor_size = anchor_size
        self.aspect_ratios = aspect_ratios
        self.class_loss = class_loss
        self.loss_weights = loss_weights
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.nms_top_k = nms_top_k
        self.detections_per_image = detections_per_image
        self.max_masks_per_image = max_masks_per_image
        channels = backbone.out_channels
        self.protonet = ProtoNet(channels, num_prototypes, proto_width)
        self.head = PredictionHead(channels, num_classes, num_prototypes, len(aspect_ratios))
        # The paper's training-only semantic segmentation loss (Sec. 3.3, "+0.4 mAP"): a 1x1 conv
        # on P3 predicting, per pixel, which classes are present (sigmoid, no background).
        self.semantic_weight = float(semantic_weight)
        self.semantic = nn.Conv2d(channels, num_classes - 1, 1) if self.semantic_weight > 0 else None
        self.register_load_state_dict_post_hook(_semantic_head_is_optional)
        mean, std = image_mean or [0.485, 0.456, 0.406], image_std or [0.229, 0.224, 0.225]
        self.register_buffer("image_mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(-1, 1, 1), persistent=False)
        self._init_class_prior()

    def _init_class_prior(self) -> None:
        # Start with background likely everywhere (RetinaNet's prior), so the first steps are
        # not swamped by thousands of confident false positives.
        bias = self.head.score.bias.detach().view(len(self.aspect_ratios), self.num_classes)
        bias.zero_()
        if self.class_loss == "focal":
            bias[:, 1:] = -math.log((1 - 0.01) / 0.01)
        else:
            bias[:, 0] = math.log(0.99 * (self.num_classes - 1) / 0.01)

    # --- input batching and anchors ---

    def batch_images(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise and pad the images (bottom/right, zeros after normalisation) to one tensor."""
        sizes = [tuple(image.shape[-2:]) for image in images]
        height = math.ceil(max(s[0] for s in sizes) / _SIZE_DIVISOR) * _SIZE_DIVISOR
        width = math.ceil(max(s[1] for s in sizes) / _SIZE_DIVISOR) * _SIZE_DIVISOR
        batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for slot, image in zip(batch, images):
            slot[:, : image.shape[-2], : image.shape[-1]] = (image - self.image_mean) / self.image_std
        return batch, sizes

    def anchors(self, feature_sizes: list[tuple[int, int]], image_size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """XYXY anchors in the order the head emits them: level, row, column, aspect ratio."""
        all_anchors = []
        for level, (fh, fw) in enumerate(feature_sizes):
            stride_y, stride_x = image_size[0] / fh, image_size[1] / fw
            side = self.anchor_size * 2**level
            ys = (torch.arange(fh, device=device, dtype=torch.float32) + 0.5) * stride_y
            xs = (torch.arange(fw, device=device, dtype=torch.float32) + 0.5) * stride_x
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            ratios = torch.tensor(self.aspect_ratios, device=device)
            half_w, half_h = side * ratios.sqrt() / 2, side / ratios.sqrt() / 2
            centres = torch.stack([cx, cy], -1).view(-1, 1, 2)
            half = torch.stack([half_w, half_h], -1).view(1, -1, 2)
            all_anchors.append(torch.cat([centres - half, centres + half], -1).view(-1, 4))
        return torch.cat(all_anchors)

    # --- forward ---

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("YOLACT in training mode needs targets (boxes, labels, masks per image)")
        batch, sizes = self.batch_images(images)
        pyramid = list(self.backbone(batch).values())
        prototypes = self.protonet(pyramid[0])  # N x k x H/4 x W/4
        offsets, logits, coefficients = (torch.cat(parts, 1) for parts in zip(*(self.head(level) for level in pyramid)))
        semantic = self.semantic(pyramid[0]).float() if self.training and self.semantic is not None else None
        anchors = self.anchors([tuple(p.shape[-2:]) for p in pyramid], tuple(batch.shape[-2:]), batch.device)
        # Losses and decoding in float32 whatever the autocast (as the semantic trainer computes
        # its loss): box coding, OHEM ranking and the per-box mask normalisation are sums and
        # small differences that bf16's 8-bit mantissa would round away.
        offsets, logits, coefficients, prototypes = (t.float() for t in (offsets, logits, coefficients, prototypes))
        with torch.autocast(batch.device.type, enabled=False):
            if self.training:
                losses = self.loss(offsets, logits, coefficients, prototypes, anchors, targets, tuple(batch.shape[-2:]))
                if semantic is not None:
                    losses["loss_semantic"] = self.semantic_weight * self.semantic_loss(semantic, targets, tuple(batch.shape[-2:]))
                return losses
            return self.postprocess(offsets, logits, coefficients, prototypes, anchors, sizes, tuple(batch.shape[-2:]))

    # --- training ---

    def match(self, anchors: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each anchor's ground-truth index and state: 1 positive (IoU >= 0.5), 0 negative (< 0.4), -1 neutral.

        Every ground truth also claims its best anchor, so no object goes unmatched.
        """
        if len(boxes) == 0:
            return torch.zeros(len(anchors), dtype=torch.long, device=anchors.device), torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
        iou = box_iou(boxes, anchors)  # G x A
        best_iou, best_gt = iou.max(0)
        best_anchor = iou.argmax(1)
        best_gt[best_anchor] = torch.arange(len(boxes), device=anchors.device)
        best_iou[best_anchor] = 1.0
        state = torch.full_like(best_gt, -1)
        state[best_iou < 0.4] = 0
        state[best_iou >= 0.5] = 1
        return best_gt, state

    def loss(self, offsets, logits, coefficients, prototypes, anchors, targets, padded_size) -> dict[str, torch.Tensor]:
        class_terms, box_terms, mask_terms = [], [], []
        num_positive = 0
        for i, target in enumerate(targets):
            boxes, labels = target["boxes"].as_subclass(torch.Tensor).float(), target["labels"]
            gt_index, state = self.match(anchors, boxes)
            positive = state == 1
            num_positive += int(positive.sum())
            class_target = torch.where(positive, labels[gt_index] if len(labels) else torch.zeros_like(gt_index), 0)
            class_terms.append(self._class_loss(logits[i], class_target, state))
            if not positive.any():
                continue
            box_terms.append(F.smooth_l1_loss(offsets[i][positive], encode_boxes(boxes[gt_index[positive]], anchors[positive]), reduction="sum"))
            mask_terms.append(self._mask_loss(prototypes[i], coefficients[i][positive], gt_index[positive], target["masks"], boxes, padded_size))
        normaliser = max(num_positive, 1)
        zero = logits.sum() * 0.0
        w_class, w_box, w_mask = self.loss_weights
        return {
            "loss_classifier": w_class * sum(class_terms, zero) / normaliser,
            "loss_box": w_box * sum(box_terms, zero) / normaliser,
            "loss_mask": w_mask * sum(mask_terms, zero) / normaliser,
        }

    def _class_loss(self, logits: torch.Tensor, class_target: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if self.class_loss == "focal":
            valid = state >= 0
            one_hot = F.one_hot(class_target[valid], self.num_classes).float()[:, 1:]
            return sigmoid_focal_loss(logits[valid][:, 1:], one_hot, reduction="sum")
        # OHEM: all positives, and the negatives the model finds hardest (highest background
        # loss), three per positive, so easy background does not drown the signal.
        per_anchor = F.cross_entropy(logits, class_target, reduction="none")
        positive = state == 1
        negative_loss = torch.where(state == 0, per_anchor.detach(), torch.full_like(per_anchor, -1.0))
        num_negative = min(max(3 * int(positive.sum()), 3), int((state == 0).sum()))
        hard = negative_loss.topk(num_negative).indices
        return per_anchor[positive].sum() + per_anchor[hard].sum()

    def _mask_loss(self, prototypes, coefficients, gt_index, gt_masks, gt_boxes, padded_size) -> torch.Tensor:
        # Many anchors match each object; a random subset bounds the cost, and the sum is
        # rescaled so every positive anchor still counts once towards the normaliser.
        total = len(gt_index)
        if total > self.max_masks_per_image:
            chosen = torch.randperm(total, device=gt_index.device)[: self.max_masks_per_image]
            gt_index, coefficients = gt_index[chosen], coefficients[chosen]
        proto_h, proto_w = prototypes.shape[-2:]
        masks = gt_masks.as_subclass(torch.Tensor).float()
        masks = F.pad(masks, (0, padded_size[1] - masks.shape[-1], 0, padded_size[0] - masks.shape[-2]))
        small = (F.interpolate(masks[None], size=(proto_h, proto_w), mode="bilinear", align_corners=False)[0] > 0.5).float()
        scale = torch.tensor([proto_w / padded_size[1], proto_h / padded_size[0]] * 2, device=gt_boxes.device)
        boxes = gt_boxes[gt_index] * scale
        logits = torch.einsum("khw,nk->nhw", prototypes, coefficients)
        bce = F.binary_cross_entropy_with_logits(logits, small[gt_index], reduction="none")
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1.0)
        per_instance = crop_masks(bce, boxes).sum((1, 2)) / area
        return per_instance.sum() * (total / len(gt_index))

    def semantic_loss(self, logits: torch.Tensor, targets: list[dict[str, torch.Tensor]], padded_size: tuple[int, int]) -> torch.Tensor:
        """Per-pixel sigmoid cross-entropy of the P3 class maps against the union of each class's
        masks (downsampled to P3), summed over classes, averaged over pixels and images."""
        height, width = logits.shape[-2:]
        wanted = torch.zeros_like(logits)
        for i, target in enumerate(targets):
            if len(target["labels"]) == 0:
                continue
            masks = target["masks"].as_subclass(torch.Tensor).float()
            masks = F.pad(masks, (0, padded_size[1] - masks.shape[-1], 0, padded_size[0] - masks.shape[-2]))
            small = (F.interpolate(masks[None], size=(height, width), mode="bilinear", align_corners=False)[0] > 0.5).float()
            wanted[i].index_add_(0, target["labels"] - 1, small).clamp_(max=1.0)  # union of the class's masks
        return F.binary_cross_entropy_with_logits(logits, wanted, reduction="sum") / (height * width * len(targets))

    # --- inference ---

    @torch.no_grad()
    def postprocess(self, offsets, logits, coefficients, prototypes, anchors, sizes, padded_size) -> list[dict[str, torch.Tensor]]:
        results = []
        scores_all = logits.softmax(-1) if self.class_loss == "ohem" else logits.sigmoid()
        boxes_all = decode_boxes(offsets, anchors)
        for i, (height, width) in enumerate(sizes):
            scores = scores_all[i][:, 1:].t()  # (C-1) x A, background left out
            candidate = scores.max(0).values > self.score_threshold
            boxes, scores, coeffs = boxes_all[i][candidate], scores[:, candidate], coefficients[i][candidate]
            classes, index = fast_nms(boxes.unsqueeze(0).expand(scores.shape[0], -1, -1), scores, self.nms_threshold, self.nms_top_k)
            kept_scores = scores[classes, index]
            good = kept_scores > self.score_threshold
            classes, index, kept_scores = classes[good], index[good], kept_scores[good]
            order = kept_scores.argsort(descending=True)[: self.detections_per_image]
            classes, index, kept_scores = classes[order], index[order], kept_scores[order]
            limit = torch.tensor([width, height, width, height], device=boxes.device, dtype=boxes.dtype)
            kept_boxes = torch.minimum(boxes[index].clamp(min=0), limit)
            results.append(
                {
                    "boxes": kept_boxes,
                    "labels": classes + 1,
                    "scores": kept_scores,
                    "masks": self.assemble_masks(prototypes[i], coeffs[index], kept_boxes, padded_size, (height, width)),
                }
            )
        return results

    def assemble_masks(self, prototypes, coefficients, boxes, padded_size, image_size) -> torch.Tensor:
        """sigmoid(P . c) at prototype resolution, upsampled to the image, cropped to the box: N x 1 x H x W.
        Eagerly on images from 256 x 256 pixels only inside the boxes (`upsample_in_boxes`);
        smaller ones, and a tracer (ONNX export, which wants no loop over the detections), take
        the whole-image upsampling and crop."""
        if image_size[0] * image_size[1] >= _BOXWISE_FROM_PIXELS and not being_traced():
            masks = torch.einsum("khw,nk->nhw", prototypes, coefficients).sigmoid()
            return upsample_in_boxes(masks, boxes, padded_size, image_size).unsqueeze(1)
        # One spare row of coefficients, dropped after the upsampling, which refuses an empty
        # batch: no branch on the detection count (data-dependent under torch.export).
        count = coefficients.shape[0]
        coefficients = torch.cat([coefficients, coefficients.new_zeros((1, coefficients.shape[1]))])
        masks = torch.einsum("khw,nk->nhw", prototypes, coefficients).sigmoid()
        # Each mask its own one-channel image: PyTorch's bilinear kernel runs 100 masks from
        # 128 to 512 pixels in about a third of the time it takes them as 100 channels of one.
        masks = F.interpolate(masks[:, None], size=padded_size, mode="bilinear", align_corners=False)[:count, 0]
        masks = masks[:, : image_size[0], : image_size[1]]
        return crop_masks(masks, boxes, in_place=True).unsqueeze(1)


@register_model("yolact", task="instance", paper="Bolya et al. 2019, YOLACT: Real-time Instance Segmentation (ICCV)")
def yolact(
    *,
    num_classes: int = 6,
    in_channels: int = 3,
    encoder: str = "resnet50",
    encoder_weights: str | None = None,
    fpn_channels: int = 256,
    num_prototypes: int = 32,
    proto_width: int = 256,
    anchor_size: int = 24,
    class_loss: str = "ohem",
    semantic_weight: float = 1.0,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.5,
    detections_per_image: int = 100,
) -> Yolact:
    """YOLACT: prototypes x per-anchor coefficients, one stage, Fast NMS.

    Args:
        num_classes: object classes including background (label 0).
        encoder: any seglab encoder name, e.g. "resnet18", "resnet50".
        num_prototypes: k, the number of prototype masks (32 in the paper).
        proto_width: channels of ProtoNet's 3x3 convolutions (256 in the paper). The last one
            runs at stride 4, so on a CPU ProtoNet costs more than a ResNet-18 encoder: at 256 x
            256 it is about 8 GFLOPs per image forward at width 256, a quarter of that at 128.
        anchor_size: anchor side on P3 (24 for the paper's 550-pixel input); doubles per level.
        class_loss: "ohem" (softmax + 3:1 hard negative mining, the paper's) or "focal".
        semantic_weight: weight of the training-only semantic segmentation loss on P3 (the
            paper's 1; 0 leaves the layer out).
    """
    backbone = encoder_fpn(encoder, in_channels=in_channels, encoder_weights=encoder_weights, out_channels=fpn_channels, min_stride=8, extra="p6p7")
    mean, std = normalisation(in_channels)
    return Yolact(
        backbone,
        num_classes,
        num_prototypes=num_prototypes,
        proto_width=proto_width,
        anchor_size=anchor_size,
        image_mean=mean,
        image_std=std,
        class_loss=class_loss,
        semantic_weight=semantic_weight,
        score_threshold=score_threshold,
        nms_threshold=nms_threshold,
        detections_per_image=detections_per_image,
    )


def _semantic_head_is_optional(module: nn.Module, incompatible_keys) -> None:
    """Checkpoints saved before the semantic head existed (or with it left out) still load: it
    only serves training, and a resumed run starts it from its initialisation."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith("semantic.")]
    incompatible_keys.unexpected_keys[:] = [k for k in incompatible_keys.unexpected_keys if not k.startswith("semantic.")]
