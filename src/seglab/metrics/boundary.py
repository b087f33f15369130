"""Boundary-quality metrics: Boundary IoU (Cheng et al., CVPR 2021) and Trimap IoU.

Boundary IoU (Cheng, Girshick, Dollar, Berg, Kirillov, "Boundary IoU: Improving Object-Centric
Image Segmentation Evaluation", CVPR 2021) compares only the pixels near each contour:

    G_d = pixels of the ground-truth mask G within distance d of its contour
        = G minus its erosion by a (2d+1) x (2d+1) square (d iterations of a 3x3 erosion),
    P_d = the same for the prediction P,
    Boundary IoU = |G_d & P_d| / |G_d | P_d|,   d = round(dilation_ratio * image diagonal), d >= 1.

As in the authors' reference code, the image is padded with background before eroding, so a
mask touching the image border has a boundary along that border too. Everything here is batched
on bit-packed masks, never a per-mask loop: torch tensors on any device (below), and on the CPU
the same words in numpy, whose uint64 shifts are vectorised (`_boundary_cpu`).

Trimap IoU (Kohli et al. 2009, used by DeepLab, Chen et al. 2015/2018) is the confusion-matrix
IoU restricted to a band of `width` pixels around the label boundaries of the ground truth.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from seglab.metrics import _boundary_cpu
from seglab.metrics._distributed import sum_over_processes
from seglab.metrics.confusion import ConfusionMatrix, nan_divide
from seglab.ops.class_map import class_indices

__all__ = [
    "BoundaryIoU",
    "TrimapIoU",
    "boundary_distance",
    "boundary_iou",
    "erode",
    "label_boundary",
    "mask_to_boundary",
]


def boundary_distance(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """d of the paper: `dilation_ratio` times the image diagonal, rounded, at least one pixel."""
    if dilation_ratio <= 0:
        raise ValueError(f"dilation_ratio must be positive, got {dilation_ratio}")
    return max(1, round(dilation_ratio * math.hypot(height, width)))


def _dilate(masks: torch.Tensor, radius: int, outside: float) -> torch.Tensor:
    """Square (2r+1) dilation of float masks B x H x W; `outside` is the value beyond the image."""
    padded = F.pad(masks.unsqueeze(1), (radius, radius, radius, radius), value=outside)
    kernel = 2 * radius + 1
    rows = F.max_pool2d(padded, kernel_size=(1, kernel), stride=1)
    return F.max_pool2d(rows, kernel_size=(kernel, 1), stride=1).squeeze(1)


# Erosion runs on bit-packed masks: 64 pixels of a row per int64 word (pixel 64k + j is bit j of
# word k, little-endian), so every AND works on 64 pixels at once, and a square erosion of
# radius r takes O(log r) ANDs per direction (the window minimum is the AND of two overlapping
# power-of-two windows): a whole batch is eroded by a few dozen tensor operations.
# On CPU numpy supplies packbits / unpackbits / bitwise_count, single SIMD passes torch lacks;
# other devices use the torch fallbacks.
_PACK = 0x0102040810204080  # times 8 bytes of 0/1 puts byte j at bit 56 + j (no carries)
_shl, _shr = torch.bitwise_left_shift, torch.bitwise_right_shift
NUMPY_ON_CPU = True  # tests switch it off to exercise the torch fallbacks on CPU


def _numpy_ok(tensor: torch.Tensor) -> bool:
    return NUMPY_ON_CPU and tensor.device.type == "cpu"


def _pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """bool B x H x W -> int64 B x H x ceil(W/64); padded columns are background (zero)."""
    masks = masks.bool()
    if _numpy_ok(masks):
        packed = torch.from_numpy(np.packbits(masks.numpy(), axis=-1, bitorder="little"))
    else:
        if masks.shape[-1] % 8:
            masks = F.pad(masks, (0, -masks.shape[-1] % 8))
        packed = _shr(masks.contiguous().view(torch.int64) * _PACK, 56).to(torch.uint8)
    if packed.shape[-1] % 8:
        packed = F.pad(packed, (0, -packed.shape[-1] % 8))
    return packed.contiguous().view(torch.int64)


def _unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    as_bytes = packed.contiguous().view(torch.uint8)
    if _numpy_ok(packed):
        return torch.from_numpy(np.unpackbits(as_bytes.numpy(), axis=-1, bitorder="little")[..., :width]).bool()
    bits = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return (_shr(as_bytes.unsqueeze(-1), bits) & torch.ones_like(bits)).flatten(-2)[..., :width].bool()


def _popcount(packed: torch.Tensor) -> torch.Tensor:
    """Number of set pixels of each packed mask B x H x Ww."""
    if _numpy_ok(packed) and hasattr(np, "bitwise_count"):  # numpy >= 2.0
        # unsigned view: numpy counts the bits of |x| for signed integers
        counts = np.bitwise_count(packed.numpy().view(np.uint64))
        return torch.from_numpy(counts.reshape(len(packed), -1).sum(1, dtype=np.int64))
    x = packed.view(torch.uint8)
    x = x - (_shr(x, 1) & 0x55)
    x = (x & 0x33) + (_shr(x, 2) & 0x33)
    x = (x + _shr(x, 4)) & 0x0F
    return x.flatten(1).sum(1, dtype=torch.int64)


def _shift_pixels(words: torch.Tensor, shift: int) -> torch.Tensor:
    """out pixel p = in pixel p + shift, along the last dim; the result is shift // 64 + 1 words
    narrower (the words it read past), never a copy of the input."""
    whole, bits = divmod(shift, 64)
    words = words[..., whole:]
    if bits == 0:
        return words[..., :-1]
    low = _shr(words[..., :-1], bits) & ((1 << (64 - bits)) - 1)  # >> is arithmetic on int64
    return low | _shl(words[..., 1:], 64 - bits)


def _erode_packed(words: torch.Tensor, radius: int) -> torch.Tensor:
    """Erosion by a (2r+1) square of packed masks B x H x Ww, outside the image = background."""
    window = 2 * radius + 1
    span = 1 << (window.bit_length() - 1)  # largest power of two <= window
    runs = [1 << i for i in range(span.bit_length() - 1)]
    # Rows: AND over [x - r, x + r]. Zero words on the left keep x - r inside the array, on the
    # right they feed the words each shift reads past.
    lead = -(-radius // 64)
    first = 64 * lead - radius
    tail = sum(run // 64 + 1 for run in runs) + (first + window - span) // 64 + 1
    rows = F.pad(words, (lead, tail))
    for run in runs:  # rows[p] becomes the AND of pixels p .. p + 2 run - 1
        shifted = _shift_pixels(rows, run)
        rows = rows[..., : shifted.shape[-1]] & shifted
    width = words.shape[-1]
    rows = _shift_pixels(rows, first)[..., :width] & _shift_pixels(rows, first + window - span)[..., :width]
    # Columns: the same with whole rows, 64 pixels per AND.
    cols = F.pad(rows, (0, 0, radius, radius))
    for run in runs:
        cols = cols[:, :-run] & cols[:, run:]
    height = words.shape[-2]
    return cols[:, :height] & cols[:, window - span : window - span + height]


def _boundary_packed(masks: torch.Tensor, dilation_ratio: float) -> torch.Tensor:
    """Packed inner boundary bands of boolean masks B x H x W."""
    radius = boundary_distance(masks.shape[-2], masks.shape[-1], dilation_ratio)
    words = _pack_bits(masks)
    return words & ~_erode_packed(words, radius)


def erode(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Erode boolean masks B x H x W by a (2r+1) square, treating outside the image as background."""
    return _unpack_bits(_erode_packed(_pack_bits(masks), radius), masks.shape[-1])


def mask_to_boundary(masks: torch.Tensor, dilation_ratio: float = 0.02) -> torch.Tensor:
    """Inner boundary band (mask minus its erosion) of boolean masks B x H x W, or H x W."""
    single = masks.dim() == 2
    batch = masks.bool().unsqueeze(0) if single else masks.bool()
    if batch.dim() != 3:
        raise ValueError(f"masks must be H x W or B x H x W, got shape {tuple(masks.shape)}")
    if batch.numel() == 0:
        return batch[0] if single else batch
    band = _unpack_bits(_boundary_packed(batch, dilation_ratio), batch.shape[-1])
    return band[0] if single else band


# Masks per chunk of the torch path: about 1 MB of bool pixels (128 KB packed), so the
# intermediates stay in cache.
_CHUNK_PIXELS = 1 << 20


def _band_counts(
    pred: torch.Tensor, target: torch.Tensor, radius: int, counted: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """|P_d & G_d| and |P_d | G_d| of each pair of bool masks B x H x W (int64, B each), counting
    only pixels where the H x W mask `counted` is set (every pixel when None)."""
    if _numpy_ok(pred) and _boundary_cpu.available():
        as_numpy = lambda masks: masks.bool().contiguous().numpy()  # noqa: E731
        return _boundary_cpu.band_counts(
            as_numpy(pred), as_numpy(target), radius, None if counted is None else as_numpy(counted)
        )
    chunk = max(1, _CHUNK_PIXELS // max(1, pred.shape[-2] * pred.shape[-1]))
    kept = None if counted is None else _pack_bits(counted[None])
    intersection, union = [], []
    for start in range(0, pred.shape[0], chunk):
        # Packing reads each chunk in place; only the 8x smaller packed words are concatenated.
        words = torch.cat([_pack_bits(pred[start : start + chunk]), _pack_bits(target[start : start + chunk])])
        pred_band, target_band = (words & ~_erode_packed(words, radius)).chunk(2)
        both, either = pred_band & target_band, pred_band | target_band
        if kept is not None:
            both, either = both & kept, either & kept
        intersection.append(_popcount(both))
        union.append(_popcount(either))
    if not intersection:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(intersection), torch.cat(union)


def boundary_iou(pred: torch.Tensor, target: torch.Tensor, dilation_ratio: float = 0.02) -> torch.Tensor:
    """Boundary IoU of aligned pairs of boolean masks B x H x W (or one pair H x W).

    Returns a float64 tensor of B values (a scalar for one pair); NaN where both boundaries
    are empty (0/0).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    single = pred.dim() == 2
    pred, target = (pred.unsqueeze(0), target.unsqueeze(0)) if single else (pred, target)
    if pred.dim() != 3:
        raise ValueError(f"masks must be H x W or B x H x W, got shape {tuple(pred.shape)}")
    radius = boundary_distance(pred.shape[-2], pred.shape[-1], dilation_ratio)
    intersection, union = _band_counts(pred, target, radius)
    iou = nan_divide(intersection.double(), union.double()).to(pred.device)
    return iou[0] if single else iou


def label_boundary(labels: torch.Tensor) -> torch.Tensor:
    """Pixels of an integer label map N x H x W with a differently labelled 8-neighbour."""
    padded = F.pad(labels.unsqueeze(1).double(), (1, 1, 1, 1), mode="replicate")
    highest = F.max_pool2d(padded, 3, stride=1)
    lowest = -F.max_pool2d(-padded, 3, stride=1)
    return (highest != lowest).squeeze(1)


def _class_masks(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    return pred.unsqueeze(1) == classes, target.unsqueeze(1) == classes


class BoundaryIoU:
    """Streaming per-class Boundary IoU for semantic segmentation.

    For each image and class c, G = (target == c) and P = (prediction == c); the boundary bands
    are intersected/united and the pixel counts summed over the data set, then
    IoU_c = sum |G_d & P_d| / sum |G_d | P_d| (dataset-level, like mIoU). Pixels whose target is
    `ignore_index` are left out of both counts. A class whose bands are empty everywhere is NaN
    and left out of the mean.
    """

    def __init__(
        self,
        num_classes: int,
        dilation_ratio: float = 0.02,
        ignore_index: int | None = 255,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        boundary_distance(1, 1, dilation_ratio)  # validates the ratio early
        self.num_classes = num_classes
        self.dilation_ratio = dilation_ratio
        self.ignore_index = ignore_index
        self.intersection = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.union = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.intersection.zero_()
        self.union.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: class indices N x H x W or scores N x K x H x W; target: N x H x W."""
        if pred.dim() == target.dim() + 1:
            pred = class_indices(pred, dim=1)
        if pred.shape != target.shape or target.dim() != 3:
            raise ValueError(f"prediction shape {tuple(pred.shape)} and target shape {tuple(target.shape)} must both be N x H x W")
        device = self.intersection.device
        pred, target = pred.to(device), target.to(device)
        valid = [None] * len(target) if self.ignore_index is None else target != self.ignore_index
        k = self.num_classes
        radius = boundary_distance(pred.shape[-2], pred.shape[-1], self.dilation_ratio)
        for image_pred, image_target, image_valid in zip(pred, target, valid):
            # One image at a time bounds memory at K masks; the K classes are one batch.
            pred_masks, target_masks = _class_masks(image_pred[None], image_target[None], k)
            intersection, union = _band_counts(pred_masks[0], target_masks[0], radius, image_valid)
            self.intersection += intersection.to(device)
            self.union += union.to(device)

    def compute(self) -> dict[str, torch.Tensor | float]:
        intersection = sum_over_processes(self.intersection).double()
        union = sum_over_processes(self.union).double()
        per_class = nan_divide(intersection, union)
        kept = per_class[~per_class.isnan()]
        return {
            "boundary_iou": per_class,
            "mboundary_iou": float(kept.mean()) if kept.numel() else float("nan"),
        }


class TrimapIoU:
    """Streaming confusion-matrix metrics restricted to a trimap band around label boundaries.

    A pixel is in the band when it lies within `width` pixels (chessboard distance) of a
    ground-truth label boundary, i.e. of a pixel with a differently labelled 8-neighbour; the
    `ignore_index` region counts as a label when finding boundaries (so the void bands of VOC
    produce a trimap, as in DeepLab) but its pixels are never counted. compute() returns the
    ConfusionMatrix dict for band pixels (key "miou" is the trimap mIoU).
    """

    def __init__(
        self,
        num_classes: int,
        width: int = 5,
        ignore_index: int | None = 255,
        device: torch.device | str = "cpu",
    ) -> None:
        if width < 0:
            raise ValueError(f"trimap width must be >= 0 pixels, got {width}")
        self.width = width
        self.ignore_index = ignore_index
        self.confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)

    def reset(self) -> None:
        self.confusion.reset()

    def band(self, target: torch.Tensor) -> torch.Tensor:
        """Boolean N x H x W band of the trimap for integer targets N x H x W."""
        edges = label_boundary(target).float()
        if self.width == 0:
            return edges.bool()
        return _dilate(edges, self.width, outside=0.0) > 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == target.dim() + 1:
            pred = class_indices(pred, dim=1)
        if pred.shape != target.shape or target.dim() != 3:
            raise ValueError(f"prediction shape {tuple(pred.shape)} and target shape {tuple(target.shape)} must both be N x H x W")
        outside_band = ~self.band(target)
        masked_target = target.masked_fill(outside_band, -1)  # negative targets are not counted
        self.confusion.update(pred, masked_target)

    def compute(self) -> dict[str, torch.Tensor | float]:
        return self.confusion.compute()
