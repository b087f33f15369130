"""Your own data: ``images/`` and ``masks/`` matched by file stem.

Layout::

    root/
      images/            a.jpg  b.png ...       (or images/train/, images/val/ ...)
      masks/             a.png  b.png ...       (or masks/train/, masks/val/ ...)
      classes.yaml       optional: class names, or a colour per class for RGB masks
      splits/train.txt   optional split lists, one stem per line (also root/train.txt)

or one folder per split, each with its own ``images/`` and ``masks/`` (``root/train/images``,
``root/val/masks`` ...; ``classes.yaml`` in root, or in a split's folder for all of them).

A mask has its image's file stem, or the stem plus one suffix shared by every mask
(``a.jpg`` with ``a_mask.png``). Masks may be index PNGs (mode L or I: the value is the
class), palette PNGs (mode P: the palette index is the class, as in Pascal VOC) or RGB
colour-coded PNGs, which need a colour table. ``classes.yaml`` takes any of these forms::

    classes: [background, cat, dog]              # names; masks hold indices
    classes: {background: [0, 0, 0], cat: [128, 0, 0]}   # name -> RGB colour
    classes: [{name: cat, color: [128, 0, 0]}, ...]
    ignore_colors: [[255, 255, 255]]             # RGB masks: these colours are ignored

Value 255 (index masks) is ignore. Without split subfolders or lists the files are split
deterministically: every tenth file (in name order, starting with the first) is held out for
"val" and "test", the rest is "train".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml
from PIL import Image

from seglab.data.base import default_palette
from seglab.data.files import FileDataset, LabelDecoder, index_lookup, read_split_list
from seglab.data.io import images_in

__all__ = ["FolderDataset", "find_class_table", "masks_by_image_stem", "read_class_table", "split_folders", "HOLDOUT_EVERY"]

HOLDOUT_EVERY = 10
_TABLE_NAMES = ("classes.yaml", "classes.yml")


class FolderDataset(FileDataset):
    """Image/mask pairs from ``root/images`` and ``root/masks`` (see the module docstring).

    Args:
        root: the data set folder.
        split: "train", "val" or "test" (or any name with a split subfolder or list).
        transform: joint transform (see :func:`seglab.data.transforms.build_transform`).
        classes: path of a class table, overriding ``root/classes.yaml``.
        ignore_index: class id of unlabelled pixels (and the stored index value meaning ignore).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[dict], dict] | None = None,
        classes: str | Path | None = None,
        ignore_index: int = 255,
    ) -> None:
        root = Path(root)
        per_split = split_folders(root)
        if per_split:
            if split not in per_split:
                raise FileNotFoundError(f"{root} holds one folder per split ({', '.join(f'{s}/' for s in per_split)}), "
                                        f"none for split {split!r}")
            pairs, unpaired = _find_pairs(root / split, split, whole=True)
        else:
            for sub in ("images", "masks"):
                if not (root / sub).is_dir():
                    raise FileNotFoundError(f"{root} has no {sub}/ folder; the folder format needs images/ and masks/ "
                                            "(or train/images/ and train/masks/ ...)")
            pairs, unpaired = _find_pairs(root, split)
        table_path = Path(classes) if classes is not None else _class_table(root, per_split)
        if table_path is not None:
            names, palette, decoder = _decoder_from_table(table_path, ignore_index)
        else:  # every split's masks, so that all splits agree on the classes
            mask_dirs = [root / name / "masks" for name in per_split] if per_split else [root / "masks"]
            names, palette, decoder = _decoder_from_masks(mask_dirs, root, ignore_index)
        super().__init__(pairs, names, palette, decoder, transform, unpaired, ignore_index)
        self.root = root
        self.split = split


def read_class_table(path: Path) -> tuple[list[str], list[tuple[int, int, int]] | None, list[tuple[int, int, int]]]:
    """Class names, their colours (None when the table gives names only) and ignore colours."""
    if not path.is_file():
        raise FileNotFoundError(f"class table {path} does not exist")
    content = yaml.safe_load(path.read_text())
    if isinstance(content, dict) and "classes" in content:
        entries, ignore = content["classes"], content.get("ignore_colors", [])
    else:
        entries, ignore = content, []
    names: list[str] = []
    colours: list[tuple[int, int, int]] = []
    if isinstance(entries, dict):
        for name, colour in entries.items():
            names.append(str(name))
            colours.append(_colour(colour, path, name))
    elif isinstance(entries, list) and entries:
        for entry in entries:
            if isinstance(entry, dict):
                if "name" not in entry:
                    raise ValueError(f"{path}: every class entry needs a 'name', got {entry!r}")
                names.append(str(entry["name"]))
                if "color" in entry or "colour" in entry:
                    colours.append(_colour(entry.get("color", entry.get("colour")), path, entry["name"]))
            else:
                names.append(str(entry))
    else:
        raise ValueError(f"{path} must list classes: names, name -> [r, g, b], or entries with name and color")
    if colours and len(colours) != len(names):
        raise ValueError(f"{path}: give a colour for every class or for none")
    if len(set(colours)) != len(colours):
        raise ValueError(f"{path}: two classes share a colour")
    return names, colours or None, [_colour(c, path, "ignore_colors") for c in ignore]


def _colour(value: Any, path: Path, name: Any) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        raise ValueError(f"{path}: colour of {name!r} must be [r, g, b] with 0..255 integers, not {value!r}")
    return (value[0], value[1], value[2])


def find_class_table(root: Path) -> Path | None:
    """root/classes.yaml (or .yml), or None."""
    for name in _TABLE_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def _class_table(root: Path, per_split: Sequence[str]) -> Path | None:
    """root's classes.yaml, else the first split folder's that has one (the same for every split)."""
    tables = (find_class_table(folder) for folder in [root, *(root / name for name in per_split)])
    return next((table for table in tables if table is not None), None)


def _decoder_from_table(path: Path, ignore_index: int) -> tuple[list[str], list[tuple[int, int, int]], LabelDecoder]:
    names, colours, ignore_colours = read_class_table(path)
    decoder = LabelDecoder(index_lookup(len(names), ignore_index, size=max(256, len(names) + 1)), ignore_index=ignore_index)
    if colours is not None:
        decoder.colours = {colour: label for label, colour in enumerate(colours)}
        decoder.colours.update({colour: ignore_index for colour in ignore_colours})
    return names, colours or default_palette(len(names)), decoder


def _decoder_from_masks(mask_dirs: Sequence[Path], root: Path, ignore_index: int) -> tuple[list[str], list[tuple[int, int, int]], LabelDecoder]:
    """No class table: the class count is the largest label found in any mask, plus one."""
    largest = 0
    for path in sorted(p for masks in mask_dirs for p in masks.rglob("*") if p.is_file()):
        try:
            with Image.open(path) as mask:
                if mask.mode in ("RGB", "RGBA"):
                    raise ValueError(
                        f"mask {path} is RGB colour-coded; put a classes.yaml with a colour per class in {root}"
                    )
                values = np.unique(np.asarray(mask))
        except OSError:
            continue  # unreadable files are the data doctor's to report
        values = values[values != ignore_index]
        if values.size:
            largest = max(largest, int(values.max()))
    num_classes = max(largest + 1, 2)
    names = [f"class_{k}" for k in range(num_classes)]
    return names, default_palette(num_classes), LabelDecoder(index_lookup(num_classes, ignore_index, size=max(256, num_classes + 1)), ignore_index=ignore_index)


def split_folders(root: Path) -> list[str]:
    """The subfolders of `root` that hold images/ and masks/ (one folder per split), when root
    has no images/ of its own; else none."""
    if (root / "images").is_dir() or not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir())


def _find_pairs(root: Path, split: str, whole: bool = False) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """Image and mask pairs of `split` under root/images and root/masks, and the files without a
    partner; `whole`: root is the split's own folder (all its pairs, no split lists or hold-out)."""
    image_dir, mask_dir = root / "images", root / "masks"
    if whole:
        if not mask_dir.is_dir():
            raise FileNotFoundError(f"{image_dir} exists but {mask_dir} does not")
    elif (image_dir / split).is_dir():
        image_dir, mask_dir = image_dir / split, mask_dir / split
        if not mask_dir.is_dir():
            raise FileNotFoundError(f"{image_dir} exists but {mask_dir} does not")
    images = {p.stem: p for p in images_in(image_dir)}
    masks = masks_by_image_stem(set(images), {p.stem: p for p in images_in(mask_dir)})
    unpaired: list[tuple[Path, str]] = []
    shared = not whole and image_dir == root / "images"  # one folder for every split: lists or the hold-out pick
    split_list = _split_list(root, split) if shared else None
    if split_list is not None:
        stems = read_split_list(split_list)
        for stem in stems:
            if stem not in images:
                unpaired.append((split_list, f"lists {stem!r} but images/ has no such file"))
            elif stem not in masks:
                unpaired.append((images[stem], f"has no mask with the same stem in {mask_dir}"))
        chosen = [s for s in stems if s in images and s in masks]
        return [(images[s], masks[s]) for s in chosen], unpaired
    if shared and _has_any_split_list(root):
        raise FileNotFoundError(f"{root} has split lists but none for split {split!r} (looked for splits/{split}.txt and {split}.txt)")
    for stem in sorted(set(images) - set(masks)):
        unpaired.append((images[stem], f"has no mask with the same stem in {mask_dir}"))
    for stem in sorted(set(masks) - set(images)):
        unpaired.append((masks[stem], f"has no image with the same stem in {image_dir}"))
    stems = sorted(set(images) & set(masks))
    if shared and len(stems) > 1:
        held_out = stems[::HOLDOUT_EVERY]
        stems = sorted(set(stems) - set(held_out)) if split == "train" else held_out
    return [(images[s], masks[s]) for s in stems], unpaired


def masks_by_image_stem(image_stems: set[str], masks: dict[str, Path]) -> dict[str, Path]:
    """Masks keyed by the stem of their image: their own stem or, where no mask has an image's
    stem but every mask's is an image's plus one same suffix (``a.jpg`` with ``a_mask.png``,
    ISIC's ``_segmentation``), that stem without the suffix."""
    if not masks or image_stems & masks.keys():
        return masks
    first = min(masks)
    cut = next((cut for cut in range(len(first) - 1, 0, -1) if first[:cut] in image_stems), None)
    if cut is None:
        return masks
    suffix = first[cut:]
    if not all(stem.endswith(suffix) and stem[:-len(suffix)] in image_stems for stem in masks):
        return masks
    return {stem[:-len(suffix)]: path for stem, path in masks.items()}


def _split_list(root: Path, split: str) -> Path | None:
    for candidate in (root / "splits" / f"{split}.txt", root / f"{split}.txt"):
        if candidate.is_file():
            return candidate
    return None


def _has_any_split_list(root: Path) -> bool:
    return bool(_listed_splits(root))


def _listed_splits(root: Path) -> set[str]:
    """Split names with a list: any splits/*.txt, and the usual names directly in root."""
    in_root = {name for name in ("train", "val", "test", "trainval") if (root / f"{name}.txt").is_file()}
    return {p.stem for p in (root / "splits").glob("*.txt")} | in_root


def folder_splits(root: Path) -> Sequence[str]:
    """The splits a folder data set offers, for the data doctor."""
    per_split = split_folders(root)
    if per_split:
        return per_split
    subfolders = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
    if subfolders:
        return subfolders
    return sorted(_listed_splits(root)) or ["train", "val"]
