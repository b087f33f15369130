"""Boundary-band pixel counts on the CPU: bit-packed words with margins, in numpy, in threads.

Layout. Masks are bit-packed along rows (64 pixels per uint64) and stored as word planes,
K x (masks * padded rows): word k of a row holds pixels [u k - r, u k - r + 64), with u = 64 - 2r,
that is u pixels of its own and r pixels of each neighbouring word on either side. With that
margin, eroding a row by radius r is a few shifts and ANDs inside each word, with no carries
between words; each mask also carries r zero rows above and below, so eroding columns is ANDs of
each plane with itself shifted by whole rows. Bits that the shifts bring in from outside a word
only ever reach the margins, and margins are masked off before counting.

Why numpy and threads: numpy's uint64 shifts are vectorised (torch's int64 shifts are not, on
the CPU) and its ufuncs release the GIL, so chunks sized for the L2 cache run on every core.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

WORD_BITS = 64
# Past this radius the margins leave under 24 own pixels per word and the plain packed layout
# of boundary.py is faster.
MAX_RADIUS = 20
# Pixels per mask group in a chunk: about 256 KB packed, so a chunk's words stay in L2.
CHUNK_PIXELS = 1 << 21


def available(radius: int) -> bool:
    return radius <= MAX_RADIUS and hasattr(np, "bitwise_count")  # bitwise_count: numpy >= 2.0


def _words(groups: list[np.ndarray], radius: int) -> np.ndarray:
    """Pack bool arrays (each n x H x W) into word planes K x (sum n * (H + 2r)): word k of a row
    holds pixels [u k - r, u k - r + 64), u = 64 - 2r, zero outside the image; each mask has r
    zero rows above and below. Plane-major, so every operation below runs on long contiguous rows."""
    height, width = groups[0].shape[1:]
    per_row = -(-width // WORD_BITS)
    # Aligned words first (pixels 64j .. 64j + 63), transposed to planes: reading them strided
    # below would cost more than this copy.
    aligned = np.zeros((per_row, sum(len(g) for g in groups), height + 2 * radius), dtype=np.uint64)
    start = 0
    for group in groups:
        packed = np.packbits(group, axis=-1, bitorder="little")  # pixel 8i + j -> bit j of byte i
        if packed.shape[-1] != 8 * per_row:
            packed = np.pad(packed, ((0, 0), (0, 0), (0, 8 * per_row - packed.shape[-1])))
        # Little-endian uint64: byte i holds bits 8i .. 8i + 7, so pixel p of a word is bit p.
        aligned[:, start : start + len(group), radius : radius + height] = packed.view(np.uint64).transpose(2, 0, 1)
        start += len(group)
    aligned = aligned.reshape(per_row, -1)
    own = WORD_BITS - 2 * radius
    words = np.zeros((-(-width // own), aligned.shape[1]), dtype=np.uint64)
    for k, word in enumerate(words):
        j, offset = divmod(own * k - radius, WORD_BITS)  # its first pixel is bit `offset` of word j
        if j >= 0:
            np.right_shift(aligned[j], offset, out=word)
        if offset and j + 1 < per_row:
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


def _erode_columns(rows: np.ndarray, radius: int) -> np.ndarray:
    """AND over rows q .. q + 2r of the K x rows planes: the erosion of row q + r; 2r rows shorter."""
    window, span = _window(radius)
    run = 1
    while run < span:
        rows = rows[:, :-run] & rows[:, run:]
        run *= 2
    shift = window - span
    return rows[:, : rows.shape[1] - shift] & rows[:, shift:]


def _chunk_counts(pred: np.ndarray, target: np.ndarray, counted: np.ndarray | None, radius: int) -> tuple[np.ndarray, np.ndarray]:
    n, height, _ = pred.shape
    period = height + 2 * radius  # rows per mask
    words = _words([pred, target] if counted is None else [pred, target, counted[None]], radius)
    eroded = _erode_columns(_erode_rows(words[:, : 2 * n * period], radius), radius)
    own = np.uint64(((1 << (WORD_BITS - 2 * radius)) - 1) << radius)  # margins are neighbours' pixels
    if counted is not None:
        first = 2 * n * period + radius
        counted_rows = np.zeros((len(words), period), dtype=np.uint64)  # one mask's period
        counted_rows[:, :height] = words[:, first : first + height]
        own = np.tile(counted_rows, 2 * n)[:, : eroded.shape[1]] & own
    # The erosion lies inside the mask, so mask minus erosion is an XOR. Row q is padded row q + r.
    band = (words[:, radius : radius + eroded.shape[1]] ^ eroded) & own

    def per_mask(bits: np.ndarray, masks: int) -> np.ndarray:
        # A row's count is at most 64 K, so uint16 holds it (summing in int64 is 4x slower).
        per_row = np.bitwise_count(bits).sum(0, dtype=np.uint16 if len(bits) < 1024 else np.int64)
        return np.add.reduceat(per_row, np.arange(masks) * period, dtype=np.int64)

    sizes = per_mask(band, 2 * n)  # |P_d| of every prediction, then |G_d| of every target
    length = n * period - 2 * radius  # first padded row of mask 0 to the last real row of mask n-1
    intersection = per_mask(band[:, :length] & band[:, n * period : n * period + length], n)
    return intersection, sizes[:n] + sizes[n:] - intersection


def band_counts(
    pred: np.ndarray, target: np.ndarray, radius: int, counted: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """|P_d & G_d| and |P_d | G_d| of each pair of bool masks n x H x W, counting only pixels
    where the H x W mask `counted` is set (all pixels when None)."""
    per_chunk = max(1, CHUNK_PIXELS // max(1, pred.shape[1] * pred.shape[2]))
    starts = range(0, len(pred), per_chunk)

    def run(start: int) -> tuple[np.ndarray, np.ndarray]:
        return _chunk_counts(pred[start : start + per_chunk], target[start : start + per_chunk], counted, radius)

    workers = min(len(starts), torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(run, starts))
    else:
        results = [run(start) for start in starts]
    intersection = np.concatenate([r[0] for r in results]) if results else np.zeros(0, dtype=np.int64)
    union = np.concatenate([r[1] for r in results]) if results else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(intersection), torch.from_numpy(union)
