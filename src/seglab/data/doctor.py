"""The data doctor: read every file of a data set once and report what would hurt training.

``check_dataset`` decodes every image and mask of every split (fully, so truncated files are
caught), and collects counts, image sizes, the histogram of stored label values, class
frequencies and each problem with the file it concerns. ``preflight`` is the same check
condensed to one line per kind of problem, for ``seglab train`` to refuse bad data before the
first epoch instead of failing in the middle of one.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from seglab.data import FORMATS, _coco_annotation_file, detect_format
from seglab.data.ade20k import ade_splits
from seglab.data.camvid import camvid_splits
from seglab.data.cityscapes import cityscapes_splits
from seglab.data.coco import CocoSemantic
from seglab.data.files import UNDEFINED, FileDataset, read_raw_mask
from seglab.data.folder import folder_splits, split_folders
from seglab.data.io import shown_size
from seglab.data.voc import voc_splits

__all__ = ["Problem", "DataReport", "check_dataset", "keypoint_problems", "lossy_mask", "preflight", "render_report", "PROBLEM_KINDS"]

# kind -> how one line of the summary describes it
PROBLEM_KINDS = {
    "missing partner": "files without their image or mask partner",
    "unreadable": "corrupt or truncated files that cannot be decoded",
    "size mismatch": "images whose mask has a different size",
    "unknown label": "masks with label values outside the classes that are not ignore",
    "unknown colour": "RGB masks with colours missing from the class table",
    "empty mask": "masks without a single labelled pixel",
    "empty split": "splits with no usable image/mask pair",
    "mixed instance": "instances whose pixels are not all of one object class in the class map",
    "no class names": "class maps (classes/) without a classes.yaml that names the classes",
    "one class": "data sets whose labelled pixels are all of one class",
    "lossy mask": "masks stored as JPEG, whose compression changes label values along every edge: save them as PNG",
    "no segmentation": "COCO objects without a mask to train on",
    "bad keypoints": "COCO keypoint annotations of the wrong length, with visibility other than 0, 1 or 2, labelled "
                     "keypoints outside the image, or a num_keypoints that does not count the labelled ones",
}
LOSSY_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Problem:
    kind: str
    file: Path
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"


@dataclass
class DataReport:
    """Everything the doctor found; ``ok`` is True when there is no problem."""

    path: Path
    format: str
    classes: list[str]
    ignore_index: int
    counts: dict[str, int] = field(default_factory=dict)
    image_sizes: Counter = field(default_factory=Counter)
    label_histogram: Counter = field(default_factory=Counter)
    class_pixels: list[int] = field(default_factory=list)
    ignored_pixels: int = 0
    problems: list[Problem] = field(default_factory=list)
    # instance folders (seglab.data.instance_doctor): objects by their class, and images by how many they hold
    instances_per_class: list[int] = field(default_factory=list)
    instances_per_image: Counter = field(default_factory=Counter)
    note: str = ""  # how the format was told, where the layout admits another reading

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def class_frequencies(self) -> list[float]:
        total = sum(self.class_pixels)
        return [pixels / total if total else 0.0 for pixels in self.class_pixels]

    def problems_by_kind(self) -> dict[str, list[Problem]]:
        grouped: dict[str, list[Problem]] = defaultdict(list)
        for problem in self.problems:
            grouped[problem.kind].append(problem)
        return dict(grouped)

    def summary_lines(self) -> list[str]:
        """One line per kind of problem: count, what it means, and the first example."""
        return [
            f"{kind}: {len(found)} ({PROBLEM_KINDS.get(kind, kind)}), e.g. {found[0]}"
            for kind, found in self.problems_by_kind().items()
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "classes": self.classes,
            "ignore_index": self.ignore_index,
            "counts": self.counts,
            "image_sizes": {f"{w}x{h}": n for (w, h), n in self.image_sizes.most_common()},
            "label_histogram": {str(value): n for value, n in sorted(self.label_histogram.items(), key=_value_order)},
            "class_pixels": dict(zip(self.classes, self.class_pixels)),
            "class_frequencies": dict(zip(self.classes, self.class_frequencies)),
            "ignored_pixels": self.ignored_pixels,
            "problems": [{"kind": p.kind, "file": str(p.file), "detail": p.detail} for p in self.problems],
            **({"note": self.note} if self.note else {}),
            **({"instances_per_class": dict(zip(self.classes, self.instances_per_class)),
                "instances_per_image": {str(k): n for k, n in sorted(self.instances_per_image.items())}}
               if self.format in ("instance", "coco") else {}),
        }


def check_dataset(path: str | Path, format: str | None = None, splits: Sequence[str] | None = None, **options: Any) -> DataReport:
    """Check every split of the data set at ``path`` (or only ``splits``).

    ``format`` as in :func:`seglab.data.open_dataset` (None detects it); ``options`` go to the
    format's class (e.g. ``classes=`` for the folder format).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data set folder {root} does not exist")
    if format is None and root.suffix == ".json":
        format = "coco"
    from seglab.data.instance_doctor import check_instance_folder, looks_like_instance_folder

    told_by_layout = format is None and root.is_dir() and looks_like_instance_folder(root)
    if told_by_layout:
        format = "instance"
    fmt = detect_format(root) if format is None else format.lower()
    if fmt == "coco":
        return _check_coco(root, **options)
    if fmt == "instance":
        report = check_instance_folder(root)
        per_split = split_folders(root)
        if told_by_layout and per_split and not any((root / name / "classes").is_dir() for name in per_split):
            report.note = ("read as an instance folder (masks hold instance ids) by its layout, one folder per split; "
                           f"`seglab data check {root} --format folder` reads the masks as class indices, as semantic "
                           "training does")
        return report
    if fmt not in FORMATS:
        raise ValueError(f"the data doctor knows the formats {', '.join(FORMATS)}, coco, instance, not {format!r}")
    chosen = list(splits) if splits is not None else _available_splits(fmt, root)
    report: DataReport | None = None
    seen: set[Problem] = set()
    checked: set[tuple[Path, Path]] = set()
    for split in chosen:
        dataset = FORMATS[fmt](root, split, **options)
        if report is None:
            report = DataReport(root, fmt, list(dataset.classes), dataset.ignore_index, class_pixels=[0] * dataset.num_classes)
        report.counts[split] = len(dataset)
        found = [Problem("missing partner", file, reason) for file, reason in dataset.unpaired]
        if not len(dataset):
            found.append(Problem("empty split", root, f"split {split!r} has no usable image/mask pair"))
        for pair in dataset.pairs:
            if pair not in checked:  # a file shared by two splits (e.g. trainval) is read once
                checked.add(pair)
                found += _check_pair(dataset, pair, report)
        for problem in found:
            if problem not in seen:
                seen.add(problem)
                report.problems.append(problem)
    if report is None:
        raise ValueError(f"{root} has no split to check")
    if splits is None and (one := _one_class(report)) is not None:  # a split alone may hold one class
        report.problems.append(one)
    return report


def _one_class(report: DataReport) -> Problem | None:
    """Every labelled pixel of the whole set in one class of several: nothing to tell apart. Most
    often binary masks that store their foreground as 255, the ignore value."""
    present = [k for k, pixels in enumerate(report.class_pixels) if pixels]
    if len(present) != 1 or len(report.classes) < 2:
        return None
    detail = f"every labelled pixel is {report.classes[present[0]]}"
    if report.ignored_pixels:
        detail += (f", and {report.ignored_pixels} pixels hold {report.ignore_index}, the ignore value: binary masks "
                   f"storing their foreground as {report.ignore_index}? store it as 1")
    return Problem("one class", report.path, detail)


def _check_coco(root: Path, **options: Any) -> DataReport:
    """COCO JSON sets: every listed image exists, decodes, has the size the file says, and every
    object's category is declared; masks are rasterised as the semantic view does."""
    files = {found[0] for found in (_coco_annotation_file(root, split) for split in ("train", "val")) if found}
    if not files:
        raise FileNotFoundError(f"no COCO annotation file under {root} (annotations/instances_<split>*.json or one *.json beside images/)")
    report: DataReport | None = None
    for annotation_file in sorted(files):
        dataset = CocoSemantic(annotation_file, split=None, **{k: v for k, v in options.items() if k == "image_dir"})
        coco = dataset.file.coco
        if report is None:
            report = DataReport(root, "coco", list(dataset.classes), dataset.ignore_index, class_pixels=[0] * dataset.num_classes,
                                instances_per_class=[0] * dataset.num_classes)
        report.counts[annotation_file.name] = len(dataset)
        declared = set(coco.cats)
        # a COCO keypoint file (person_keypoints_*.json): categories that name their keypoints
        joints = {c["id"]: len(c["keypoints"]) for c in coco.cats.values() if c.get("keypoints")}
        if joints:
            report.note = (f"{annotation_file.name} is a COCO keypoint file ({max(joints.values())} keypoints per object): "
                           "seglab train --task keypoint trains on it")
        for annotation in coco.dataset.get("annotations", []):
            if annotation.get("category_id") not in declared:
                report.problems.append(Problem("unknown label", annotation_file, f"annotation {annotation.get('id')} has category {annotation.get('category_id')}, which the file does not declare"))
            elif annotation["category_id"] in joints:
                report.problems += keypoint_problems(annotation, joints[annotation["category_id"]], coco.imgs.get(annotation.get("image_id"), {}), annotation_file)
        for index, image_id in enumerate(dataset.file.image_ids):
            info = coco.imgs[image_id]
            path = dataset.file.image_dir / info["file_name"]
            if not path.is_file():
                report.problems.append(Problem("missing partner", path, f"is listed in {annotation_file.name} (image id {image_id}) but does not exist"))
                continue
            size, problem = decoded_size(path)
            if problem:
                report.problems.append(problem)
                continue
            report.image_sizes[size] += 1
            if (info.get("width"), info.get("height")) != size:
                report.problems.append(Problem("size mismatch", path, f"is {size[0]}x{size[1]} but {annotation_file.name} says {info.get('width')}x{info.get('height')}"))
                continue
            objects = dataset.file.objects(image_id)
            if any(a.get("category_id") not in declared for a in objects):
                continue  # reported above, and the semantic view cannot rasterise it
            instances = [dataset.file.label_of_category[a["category_id"]] for a in objects if not a.get("iscrowd", 0)]
            report.instances_per_image[len(instances)] += 1
            for label in instances:
                report.instances_per_class[label] += 1
            without = [a for a in objects if "segmentation" not in a]
            if without:  # keypoint files may leave masks out: the objects count, their pixels cannot
                if not all(a["category_id"] in joints for a in without):
                    report.problems.append(Problem("no segmentation", annotation_file, f"annotation {without[0].get('id')} "
                                                   f"(image id {image_id}) has no segmentation"))
                continue
            mask = dataset[index]["mask"].numpy()
            _count(mask, mask, report)
            if not ((mask >= 0) & (mask < len(report.classes))).any():
                report.problems.append(Problem("empty mask", path, "has no labelled pixel (crowd regions only)"))
    assert report is not None
    return report


def keypoint_problems(annotation: dict[str, Any], joints: int, image: dict[str, Any], annotation_file: Path) -> list[Problem]:
    """What is wrong with one COCO keypoint annotation (``joints`` keypoints in its category) on
    its image (the file's image entry): the "bad keypoints" of PROBLEM_KINDS, at most one line."""
    name = f"annotation {annotation.get('id')} (image id {annotation.get('image_id')})"
    flat = annotation.get("keypoints")
    if not isinstance(flat, list) or len(flat) != 3 * joints:
        size = len(flat) if isinstance(flat, list) else "no"
        return [Problem("bad keypoints", annotation_file, f"{name} has {size} keypoint values; its category's {joints} keypoints need {3 * joints}")]
    points = np.asarray(flat, dtype=np.float64).reshape(joints, 3)
    if not np.isin(points[:, 2], (0, 1, 2)).all():
        return [Problem("bad keypoints", annotation_file, f"{name} has visibility values {sorted(set(points[:, 2].tolist()) - {0, 1, 2})}, not 0, 1 or 2")]
    labelled = points[points[:, 2] > 0]
    width, height = image.get("width"), image.get("height")
    if width and height and ((labelled[:, 0] < 0) | (labelled[:, 0] > width) | (labelled[:, 1] < 0) | (labelled[:, 1] > height)).any():
        return [Problem("bad keypoints", annotation_file, f"{name} has labelled keypoints outside its {width}x{height} image")]
    if "num_keypoints" in annotation and annotation["num_keypoints"] != len(labelled):
        return [Problem("bad keypoints", annotation_file, f"{name} says num_keypoints {annotation['num_keypoints']} but labels {len(labelled)}")]
    return []


def preflight(path: str | Path, format: str | None = None, *, one_size: bool = False, **options: Any) -> list[str]:
    """The doctor's findings as one line per kind of problem; empty when the data is fit to train.
    `one_size`: the images will be batched as they are (no --image-size), so sizes that differ
    are a problem too (a batch is one tensor)."""
    if format is None and Path(path).is_dir():
        format = detect_format(path)  # semantic training: one folder per split is the folder format, not instances
    report = check_dataset(path, format, **options)
    lines = report.summary_lines()
    if one_size and len(report.image_sizes) > 1:
        common = ", ".join(f"{w}x{h}" for (w, h), _ in report.image_sizes.most_common(3))
        lines.append(f"image sizes: {len(report.image_sizes)} different (most common {common}), and a batch needs "
                     "one size: give --image-size N or WxH to train and validate at one size, or --batch-size 1")
    if lines:
        named = f" --format {format}" if format == "folder" and split_folders(Path(path)) else ""
        lines.append(f"run `seglab data check {path}{named}` for every file concerned")
    return lines


def _value_order(item: tuple[Any, int]) -> tuple[bool, Any]:
    """Index values in numeric order, colour codes (strings) after them."""
    return isinstance(item[0], str), item[0]


def _available_splits(fmt: str, root: Path) -> list[str]:
    finder = {"folder": folder_splits, "voc": voc_splits, "camvid": camvid_splits, "cityscapes": cityscapes_splits, "ade20k": ade_splits}
    splits = list(finder[fmt](root))
    if not splits:
        raise ValueError(f"{root} holds no split of the {fmt} format")
    return splits


def decoded_size(path: Path) -> tuple[tuple[int, int] | None, Problem | None]:
    """An image's (width, height) as read (EXIF orientation applied) after a full decode, or
    the problem that stopped it."""
    try:
        with Image.open(path) as image:
            image.load()
            return shown_size(image), None
    except (OSError, SyntaxError, ValueError) as error:
        return None, Problem("unreadable", path, f"cannot be decoded ({error})")


def lossy_mask(path: Path) -> Problem | None:
    """A mask stored in a lossy format: its label values are smeared along every edge (a 0/1/2
    mask saved as JPEG reads back with values up to 5, each taken for a class of its own)."""
    if path.suffix.lower() in LOSSY_SUFFIXES:
        return Problem("lossy mask", path, "is stored as JPEG")
    return None


def _check_pair(dataset: FileDataset, pair: tuple[Path, Path], report: DataReport) -> list[Problem]:
    image_path, mask_path = pair
    problems: list[Problem] = []
    image_size, problem = decoded_size(image_path)
    if problem:
        problems.append(problem)
    if lossy := lossy_mask(mask_path):
        problems.append(lossy)
    try:
        raw = read_raw_mask(mask_path)
    except (OSError, SyntaxError, ValueError) as error:
        return problems + [Problem("unreadable", mask_path, f"cannot be decoded ({error})")]
    report.image_sizes[(raw.shape[1], raw.shape[0]) if image_size is None else image_size] += 1
    if image_size is not None and image_size != (raw.shape[1], raw.shape[0]):
        problems.append(Problem("size mismatch", mask_path, f"is {raw.shape[1]}x{raw.shape[0]} but its image {image_path.name} is {image_size[0]}x{image_size[1]} (W x H)"))
    if raw.ndim == 3 and not dataset.decoder.colours:
        return problems + [Problem("unknown colour", mask_path, "is an RGB colour-coded mask but the data set has no colour table (classes.yaml)")]
    labels = dataset.decoder.labels(raw)
    _count(raw, labels, report)
    undefined = labels == UNDEFINED
    if undefined.any():
        problems.append(_unknown_values(raw, undefined, mask_path, report))
    valid = (labels >= 0) & (labels < len(report.classes))
    if not valid.any():
        problems.append(Problem("empty mask", mask_path, "has no labelled pixel (all ignore or unknown)"))
    return problems


def _count(raw: np.ndarray, labels: np.ndarray, report: DataReport) -> None:
    if raw.ndim == 3:
        codes, counts = np.unique((raw[..., 0].astype(np.int64) << 16) | (raw[..., 1].astype(np.int64) << 8) | raw[..., 2], return_counts=True)
        report.label_histogram.update({f"#{int(code):06x}": int(n) for code, n in zip(codes, counts)})
    elif raw.dtype in (np.uint8, np.uint16):  # bincount is far cheaper than sorting for small values
        counts = np.bincount(raw.ravel())
        report.label_histogram.update({int(v): int(counts[v]) for v in np.flatnonzero(counts)})
    else:
        values, counts = np.unique(raw, return_counts=True)
        report.label_histogram.update({int(v): int(n) for v, n in zip(values, counts)})
    num_classes = len(report.classes)
    valid = (labels >= 0) & (labels < num_classes)
    per_class = np.bincount(labels[valid].ravel(), minlength=num_classes)
    report.class_pixels = [total + int(n) for total, n in zip(report.class_pixels, per_class)]
    report.ignored_pixels += int((~valid).sum())


def _unknown_values(raw: np.ndarray, undefined: np.ndarray, mask_path: Path, report: DataReport) -> Problem:
    pixels = int(undefined.sum())
    if raw.ndim == 3:
        colours = np.unique(raw[undefined], axis=0)[:5]
        shown = ", ".join(f"({r}, {g}, {b})" for r, g, b in colours.tolist())
        return Problem("unknown colour", mask_path, f"has {pixels} pixels in colours not in the class table: {shown}")
    values = np.unique(raw[undefined])[:8]
    return Problem(
        "unknown label",
        mask_path,
        f"has {pixels} pixels with values {', '.join(map(str, values.tolist()))}, outside classes 0..{len(report.classes) - 1} and not ignore ({report.ignore_index})",
    )


def render_report(report: DataReport, console: Any = None) -> None:
    """Print the report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    ignore = "" if report.format == "instance" else f"  ignore: {report.ignore_index}"
    console.print(f"[bold]{report.path}[/bold]  format: {report.format}  classes: {len(report.classes)}{ignore}")
    if report.note:
        console.print(report.note)
    splits = Table(title="pairs per split")
    splits.add_column("split")
    splits.add_column("pairs", justify="right")
    for split, count in report.counts.items():
        splits.add_row(split, str(count))
    console.print(splits)
    sizes = Table(title="image sizes (W x H)")
    sizes.add_column("size")
    sizes.add_column("images", justify="right")
    for (width, height), count in report.image_sizes.most_common(10):
        sizes.add_row(f"{width}x{height}", str(count))
    if len(report.image_sizes) > 10:
        sizes.add_row("...", f"{len(report.image_sizes) - 10} more sizes")
    console.print(sizes)
    if report.format != "instance":
        _render_labels(report, console)
    if report.format in ("instance", "coco"):  # a COCO file's objects, crowds left out
        _render_instances(report, console)
    if report.ok:
        console.print("[green]no problems found[/green]")
        return
    for kind, found in report.problems_by_kind().items():
        console.print(f"[red bold]{kind}[/red bold]: {len(found)} {PROBLEM_KINDS.get(kind, kind)}")
        for problem in found:
            console.print(f"  {problem.file}: {problem.detail}", markup=False, highlight=False)


def _render_instances(report: DataReport, console: Any) -> None:
    from rich.table import Table

    classes = Table(title="instances per class")
    for name, justify in (("id", "right"), ("class", "left"), ("instances", "right"), ("pixels", "right")):
        classes.add_column(name, justify=justify)
    for index, (name, count, pixels) in enumerate(zip(report.classes, report.instances_per_class, report.class_pixels)):
        if index:
            classes.add_row(str(index), name, str(count), str(pixels))
    console.print(classes)
    per_image = Table(title="instances per image")
    per_image.add_column("instances", justify="right")
    per_image.add_column("images", justify="right")
    for label, images in _instance_bins(report.instances_per_image):
        per_image.add_row(label, str(images))
    console.print(per_image)


def _instance_bins(per_image: Counter) -> list[tuple[str, int]]:
    """Images by how many instances they hold: each count where there are few counts, else in
    bins that double (0, 1, 2-3, 4-7, ...), so that DSB2018's 664 images take ten rows."""
    if len(per_image) <= 12:
        return [(str(count), images) for count, images in sorted(per_image.items())]
    bins: Counter = Counter()
    for count, images in per_image.items():
        low = 0 if count == 0 else 1 << (count.bit_length() - 1)
        bins[low] += images
    return [(str(low) if low < 2 else f"{low}-{2 * low - 1}", images) for low, images in sorted(bins.items())]


def _render_labels(report: DataReport, console: Any) -> None:
    from rich.table import Table

    histogram = Table(title="stored label values")
    histogram.add_column("value")
    histogram.add_column("pixels", justify="right")
    histogram.add_column("share", justify="right")
    total = sum(report.label_histogram.values()) or 1
    for value, count in sorted(report.label_histogram.items(), key=_value_order):
        histogram.add_row(str(value), str(count), f"{100 * count / total:.2f}%")
    console.print(histogram)
    classes = Table(title="class frequencies (share of labelled pixels)")
    classes.add_column("id", justify="right")
    classes.add_column("class")
    classes.add_column("pixels", justify="right")
    classes.add_column("share", justify="right")
    for index, (name, pixels, share) in enumerate(zip(report.classes, report.class_pixels, report.class_frequencies)):
        classes.add_row(str(index), name, str(pixels), f"{100 * share:.2f}%")
    classes.add_row("", "ignored", str(report.ignored_pixels), "")
    console.print(classes)
