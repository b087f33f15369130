"""Boundary-band pixel counts on the CPU: bit-packed word planes, in numpy.

Layout. Masks are bit-packed along rows (64 pixels per uint64, pixel 64 j + i in bit i of word
j) into word planes, K x (masks * rows): plane j holds word j of every row of every mask, one
mask's rows after another. Shifting a row by s pixels is then two whole-plane shifts and an OR,
the second carrying the bits that cross from one word into the next; eroding a row by radius r
is log2(2r) such shift-and-AND doublings. Eroding columns is ANDs of each plane with itself
shifted by whole rows; the rows within r of a mask's top or bottom (where that reads across into
the neighbouring mask) erode to nothing, since outside the image is background, and are set so.
Band = mask XOR erosion (the erosion lies inside the mask), counted with `bitwise_count`.

Why numpy: its uint64 shifts are vectorised (torch's int64 shifts are not, on the CPU), and
packbits and bitwise_count are single passes.
"""
from __future__ import annotations

import numpy as np
import torch

WORD_BITS = 64
# Pixels per mask group in a chunk (256 KB packed): big enough to amortise numpy's cost per
# call, small enough for the words to stay in cache.
CHUNK_PIXELS = 1 << 21


def available() -> bool:
    return hasattr(np, "bitwise_count")  # numpy >= 2.0


def _planes(groups: list[np.ndarray]) -> np.ndarray:
    """bool arrays n_i x H x W -> uint64 ceil(W/64) x (sum n_i H), zero past the last column."""
    height, width = groups[0].shape[1:]
    per_row = -(-width // WORD_BITS)
    planes = np.empty((per_row, sum(len(g) for g in groups) * height), dtype=np.uint64)
    start = 0
    for masks in groups:
        if width % WORD_BITS == 0:  # rows end on word boundaries: pack the flat array (faster)
            packed = np.packbits(masks.reshape(-1), bitorder="little")
        else:
            packed = np.packbits(masks, axis=-1, bitorder="little")  # pixel 8i + j -> bit j of byte i
            packed = np.pad(packed, ((0, 0), (0, 0), (0, 8 * per_row - packed.shape[-1])))
        # Transposing the packed words is cheap (packbits on a transposed view is not).
        planes[:, start : start + len(masks) * height] = packed.view(np.uint64).reshape(-1, per_row).T
        start += len(masks) * height
    return planes


def _shifted(planes: np.ndarray, shift: int) -> np.ndarray:
    """Bit p of the result is pixel p + shift of the same row (shift > 0 moves pixels towards the
    row's start, shift < 0 towards its end); background beyond the row's ends."""
    whole, bits = divmod(abs(shift), WORD_BITS)
    kept = len(planes) - whole  # planes that receive pixels
    if kept <= 0:
        return np.zeros_like(planes)
    out = np.empty_like(planes)
    if shift > 0:  # plane j reads plane j + whole, and the bits carried from plane j + whole + 1
        out[kept:] = 0
        np.right_shift(planes[whole:], np.uint64(bits), out=out[:kept])
        if bits:
            out[: kept - 1] |= planes[whole + 1 :] << np.uint64(WORD_BITS - bits)
    else:  # plane j reads plane j - whole, and the bits carried from plane j - whole - 1
        out[:whole] = 0
        np.left_shift(planes[:kept], np.uint64(bits), out=out[whole:])
        if bits:
            out[whole + 1 :] |= planes[: kept - 1] >> np.uint64(WORD_BITS - bits)
    return out


def _window(radius: int) -> tuple[int, int]:
    """(2r + 1, the largest power of two not above it): the square window is covered by two
    overlapping power-of-two windows, each built by doubling."""
    window = 2 * radius + 1
    return window, 1 << (window.bit_length() - 1)


def _erode_rows(planes: np.ndarray, radius: int) -> np.ndarray:
    window, span = _window(radius)
    run = 1
    while run < span:  # bit p becomes the AND of pixels p .. p + 2 run - 1
        shifted = _shifted(planes, run)
        shifted &= planes
        planes, run = shifted, run * 2
    # [p - r, p + r] is the window starting at p - r and the one ending at p + r.
    eroded = _shifted(planes, -radius)
    second = radius + 1 - span
    eroded &= _shifted(planes, second) if second else planes
    return eroded


def _erode_columns(rows: np.ndarray, radius: int, height: int) -> np.ndarray:
    """Erode K x (n H) planes of n masks of `height` rows by r rows up and down."""
    eroded = np.zeros_like(rows)
    if height <= 2 * radius:
        return eroded  # every row is within r of the top or the bottom
    window, span = _window(radius)
    run = 1
    while run < span:  # row q becomes the AND of rows q .. q + 2 run - 1
        rows = rows[:, :-run] & rows[:, run:]
        run *= 2
    shift = window - span
    np.bitwise_and(rows[:, : rows.shape[1] - shift], rows[:, shift:], out=eroded[:, radius : eroded.shape[1] - radius])
    per_mask = eroded.reshape(len(eroded), -1, height)
    per_mask[:, :, :radius] = 0
    per_mask[:, :, height - radius :] = 0
    return eroded


def _chunk_counts(pred: np.ndarray, target: np.ndarray, counted: np.ndarray | None, radius: int) -> tuple[np.ndarray, np.ndarray]:
    n, height, width = pred.shape
    planes = _planes([pred, target])
    band = planes ^ _erode_columns(_erode_rows(planes, radius), radius, height)
    band = band.reshape(len(planes), 2 * n, height)
    if counted is not None:
        band &= _planes([counted[None]])[:, None, :]

    def per_mask(bits: np.ndarray) -> np.ndarray:
        # A row's count is at most 64 K, so uint16 holds it (summing in int64 is 4x slower).
        per_row = np.bitwise_count(bits).sum(0, dtype=np.uint16 if len(bits) < 1024 else np.int64)
        return per_row.sum(-1, dtype=np.int64)

    sizes = per_mask(band)  # |P_d| of every prediction, then |G_d| of every target
    intersection = per_mask(band[:, :n] & band[:, n:])
    return intersection, sizes[:n] + sizes[n:] - intersection


def band_counts(
    pred: np.ndarray, target: np.ndarray, radius: int, counted: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """|P_d & G_d| and |P_d | G_d| of each pair of bool masks n x H x W, counting only pixels
    where the H x W mask `counted` is set (all pixels when None)."""
    per_chunk = max(1, CHUNK_PIXELS // max(1, pred.shape[1] * pred.shape[2]))
    results = [
        _chunk_counts(pred[start : start + per_chunk], target[start : start + per_chunk], counted, radius)
        for start in range(0, len(pred), per_chunk)
    ]
    intersection = np.concatenate([r[0] for r in results]) if results else np.zeros(0, dtype=np.int64)
    union = np.concatenate([r[1] for r in results]) if results else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(intersection), torch.from_numpy(union)
