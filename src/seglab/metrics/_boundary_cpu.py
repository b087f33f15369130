"""Boundary-band pixel counts on the CPU: bit-packed words with margins, in numpy.

Layout. Masks are bit-packed along rows (64 pixels per uint64) into word planes, K x (masks *
rows), the rows of all masks one after another in each plane. Word k of a row holds pixels
[u k - r, u k - r + 64), u = 64 - 2r: u pixels of its own and r pixels of each neighbouring word
on either side. With that margin, eroding a row by radius r is a few shifts and ANDs inside each
word, with no carries between words; bits that the shifts bring in from outside a word only
ever reach the margins, and margins are masked off before counting. Eroding columns is ANDs of
each plane with itself shifted by whole rows; the rows within r of a mask's top or bottom (which
that reads across into the neighbouring mask) erode to nothing, since outside the image is
background, and are set so.

Why numpy: its uint64 shifts are vectorised (torch's int64 shifts are not, on the CPU), and
packbits and bitwise_count are single passes.
"""
from __future__ import annotations

import numpy as np
import torch

WORD_BITS = 64
# Past this radius the margins leave under 24 own pixels per word and the plain packed layout
# of boundary.py is faster.
MAX_RADIUS = 20
# Pixels per mask group in a chunk (256 KB packed): the fastest of 2^19 .. 2^22 measured here,
# big enough to amortise numpy's cost per call, small enough for the words to stay in cache.
CHUNK_PIXELS = 1 << 21


def available(radius: int) -> bool:
    return radius <= MAX_RADIUS and hasattr(np, "bitwise_count")  # bitwise_count: numpy >= 2.0


def _aligned_planes(groups: list[np.ndarray]) -> np.ndarray:
    """bool arrays n_i x H x W -> uint64 ceil(W/64) x (sum n_i H): plane j holds pixels 64j ..
    64j + 63 of every row (pixel 64j + i is bit i: little-endian bit and byte order)."""
    height, width = groups[0].shape[1:]
    per_row = -(-width // WORD_BITS)
    planes = np.empty((per_row, sum(len(g) for g in groups) * height), dtype=np.uint64)
    start = 0
    for masks in groups:
        packed = np.packbits(masks, axis=-1, bitorder="little")  # pixel 8i + j -> bit j of byte i
        if packed.shape[-1] != 8 * per_row:
            packed = np.pad(packed, ((0, 0), (0, 0), (0, 8 * per_row - packed.shape[-1])))
        # Transposing the packed words is cheap (packbits on a transposed view is not).
        planes[:, start : start + len(masks) * height] = packed.view(np.uint64).reshape(-1, per_row).T
        start += len(masks) * height
    return planes


def _with_margins(aligned: np.ndarray, radius: int, width: int) -> np.ndarray:
    """Aligned planes -> planes of words with r-pixel margins, zero outside the image."""
    own = WORD_BITS - 2 * radius
    words = np.zeros((-(-width // own), aligned.shape[1]), dtype=np.uint64)
    for k, word in enumerate(words):
        j, offset = divmod(own * k - radius, WORD_BITS)  # its first pixel is bit `offset` of word j
        if j >= 0:
            np.right_shift(aligned[j], offset, out=word)
        if offset and j + 1 < len(aligned):
            word |= aligned[j + 1] << (WORD_BITS - offset)
    return words


def _window(radius: int) -> tuple[int, int]:
    """(2r + 1, the largest power of two not above it): the square window is covered by two
    overlapping power-of-two windows, each built by doubling."""
    window = 2 * radius + 1
    return window, 1 << (window.bit_length() - 1)


def _erode_rows(words: np.ndarray, radius: int) -> np.ndarray:
    window, span = _window(radius)
    run = 1
    while run < span:  # bit p becomes the AND of pixels p .. p + 2 run - 1
        words = words & (words >> run)
        run *= 2
    # [p - r, p + r] is the window starting at p - r and the one ending at p + r.
    second = radius + 1 - span
    return (words << radius) & (words >> second if second >= 0 else words << -second)


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
    words = _with_margins(_aligned_planes([pred, target]), radius, width)
    eroded = _erode_columns(_erode_rows(words, radius), radius, height)
    # The erosion lies inside the mask, so mask minus erosion is an XOR.
    band = (words ^ eroded).reshape(len(words), 2 * n, height)
    band &= np.uint64(((1 << (WORD_BITS - 2 * radius)) - 1) << radius)  # margins: neighbours' pixels
    if counted is not None:
        band &= _with_margins(_aligned_planes([counted[None]]), radius, width)[:, None, :]

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
