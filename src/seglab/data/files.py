"""What every on-disk format shares: a list of (image, mask) file pairs and a label decoder.

A format module only has to find its pairs and say how stored mask values become class ids;
reading, label mapping and augmentation happen here, once. Masks are decoded with lookup
tables (never a per-pixel Python loop): a stored value ``v`` becomes ``lookup[v]``, where the
table holds a class id, the ignore index, or ``UNDEFINED`` for values the format does not know
(those train as ignore; the data doctor reports them).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from seglab.data.base import SegmentationDataset
from seglab.data.io import decode_rgb, shown_size

__all__ = [
    "UNDEFINED",
    "FileDataset",
    "TransformedDataset",
    "LabelDecoder",
    "read_raw_mask",
    "index_lookup",
    "colour_codes",
    "equal_size_batches",
]

UNDEFINED = -1


def read_raw_mask(path: Path) -> np.ndarray:
    """Decode a mask file as stored: H x W values for index/palette PNGs, H x W x 3 for RGB."""
    with Image.open(path) as mask:
        if mask.mode == "P" or mask.mode == "L" or mask.mode.startswith("I"):
            return np.asarray(mask)
        if mask.mode == "RGBA" or mask.mode == "LA":
            mask = mask.convert("RGB" if mask.mode == "RGBA" else "L")
        return np.asarray(mask)


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """Pack H x W x 3 uint8 colours into one int32 per pixel (0xRRGGBB)."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def index_lookup(num_classes: int, ignore_index: int = 255, size: int = 256) -> np.ndarray:
    """The identity table: 0..K-1 are classes, ``ignore_index`` is ignore, the rest undefined."""
    table = np.full(size, UNDEFINED, np.int64)
    table[:num_classes] = np.arange(num_classes)
    if 0 <= ignore_index < size:
        table[ignore_index] = ignore_index
    return table


@dataclass
class LabelDecoder:
    """Turns a stored mask into class ids.

    Either ``lookup`` (stored index value -> class id) or ``colours`` (RGB triple -> class id,
    for colour-coded masks) is used; an RGB mask with no colour table is an error.
    """

    lookup: np.ndarray
    colours: dict[tuple[int, int, int], int] = field(default_factory=dict)
    ignore_index: int = 255

    def labels(self, raw: np.ndarray) -> np.ndarray:
        """Class ids (int64, undefined values included as ``UNDEFINED``) for a raw mask."""
        if raw.ndim == 3:
            return self._labels_from_colours(raw)
        values = raw.astype(np.int64)
        if values.max(initial=0) >= len(self.lookup) or values.min(initial=0) < 0:
            out = np.full(values.shape, UNDEFINED, np.int64)
            inside = (values >= 0) & (values < len(self.lookup))
            out[inside] = self.lookup[values[inside]]
            return out
        return self.lookup[values]

    def _labels_from_colours(self, rgb: np.ndarray) -> np.ndarray:
        if not self.colours:
            raise ValueError("this mask is RGB colour-coded but the data set has no colour table (classes.yaml)")
        codes, inverse = np.unique(colour_codes(rgb), return_inverse=True)
        by_code = {(r << 16) | (g << 8) | b: label for (r, g, b), label in self.colours.items()}
        per_code = np.array([by_code.get(int(code), UNDEFINED) for code in codes], np.int64)
        return per_code[inverse.reshape(rgb.shape[:2])]

    def mask(self, raw: np.ndarray) -> np.ndarray:
        """Class ids for training: undefined values become the ignore index."""
        labels = self.labels(raw)
        labels[labels == UNDEFINED] = self.ignore_index
        return labels


class FileDataset(SegmentationDataset):
    """Image/mask file pairs decoded with a :class:`LabelDecoder`, optionally augmented.

    Args:
        pairs: (image file, mask file) per sample.
        classes: class names, index = class id.
        palette: one RGB colour per class.
        decoder: stored mask values -> class ids.
        transform: a joint transform from :mod:`seglab.data.transforms` (or None).
        unpaired: files found without their partner, with the reason; they are left out of
            the data set and the data doctor reports them.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        classes: Sequence[str],
        palette: Sequence[tuple[int, int, int]],
        decoder: LabelDecoder,
        transform: Callable[[dict], dict] | None = None,
        unpaired: Sequence[tuple[Path, str]] = (),
        ignore_index: int = 255,
    ) -> None:
        self.pairs = [(Path(image), Path(mask)) for image, mask in pairs]
        self.classes = tuple(classes)
        self.palette = [tuple(int(c) for c in colour) for colour in palette]
        self.decoder = decoder
        self.transform = transform
        self.unpaired = list(unpaired)
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def load_image(self, index: int) -> torch.Tensor:
        """The image at native size, uint8 3 x H x W."""
        return decode_rgb(self.pairs[index][0])

    def load_mask(self, index: int) -> torch.Tensor:
        """The class-id mask at native size, int64 H x W, without augmentation."""
        return torch.from_numpy(self.decoder.mask(read_raw_mask(self.pairs[index][1])))

    def image_sizes(self) -> list[tuple[int, int]]:
        """Each image's (width, height) as read, from its file's header (nothing decoded)."""
        sizes = []
        for image, _ in self.pairs:
            with Image.open(image) as picture:
                sizes.append(shown_size(picture))
        return sizes

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self.pairs):
            raise IndexError(index)
        with one_thread():
            image, mask = self.load_image(index), self.load_mask(index)
            if image.shape[1:] != mask.shape:
                raise ValueError(
                    f"image {self.pairs[index][0]} is {tuple(image.shape[1:])} but its mask "
                    f"{self.pairs[index][1]} is {tuple(mask.shape)} (H x W); run `seglab data check`"
                )
            if self.transform is not None:
                return self.transform({"image": image, "mask": mask})
            return {"image": image.float().div_(255), "mask": mask}


def equal_size_batches(dataset: SegmentationDataset, batch_size: int) -> list[list[int]] | None:
    """The indices of a data set whose images come at their own sizes (opened without an
    `image_size`), cut into batches of up to `batch_size` images of one size (a batch is one
    tensor), in order within each size; the sizes come from the data set's `image_sizes()`
    (the files' headers, a COCO file's records), nothing is decoded. None where every image has
    one size or the data set cannot tell its sizes up front: plain batches do then."""
    sizes = getattr(dataset, "image_sizes", lambda: None)()
    if sizes is None:
        return None
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    if len(by_size) < 2:
        return None
    return [members[start:start + batch_size] for members in by_size.values()
            for start in range(0, len(members), batch_size)]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run per-sample work on one intra-op thread, then restore the count.

    Resizing and jittering one image gains nothing from several threads, but when samples are
    loaded in the training process (``workers=0``) on a busy CPU, the thread pool's barriers
    stall: CamVid's training loader measured 1.0 images/s with 2 threads against 22 with 1 on
    this 2-core machine under load (docs/data.md). DataLoader workers already use one thread.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def read_split_list(path: Path) -> list[str]:
    """Non-empty, stripped lines of a split list file."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class TransformedDataset(SegmentationDataset):
    """Any semantic data set with a joint transform applied to its samples (e.g. COCO's view)."""

    def __init__(self, dataset: SegmentationDataset, transform: Callable[[dict], dict] | None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.classes = dataset.classes
        self.palette = dataset.palette
        self.ignore_index = dataset.ignore_index
        self.in_channels = dataset.in_channels

    def __len__(self) -> int:
        return len(self.dataset)

    def load_mask(self, index: int) -> torch.Tensor:
        """The mask without augmentation (what class statistics count)."""
        return self.dataset[index]["mask"]

    def image_sizes(self) -> list[tuple[int, int]] | None:
        """The wrapped data set's (width, height) per image, where it can tell them up front."""
        return getattr(self.dataset, "image_sizes", lambda: None)()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with one_thread():
            sample = self.dataset[index]
            return self.transform(sample) if self.transform is not None else sample
