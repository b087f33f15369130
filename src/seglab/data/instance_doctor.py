"""The data doctor for instance folders (`seglab.data.instance.InstanceFolder`): every image,
instance map and class map read once, with the counts an instance set is judged by (instances
per class, instances per image) and each problem with the file it concerns.

An instance folder is told from a semantic one by its layout: ``train/images`` + ``train/masks``
(one folder per split), or a ``classes/`` folder of class maps beside ``images/`` and ``masks/``;
``seglab data check PATH --format instance`` names it outright.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from seglab.data.doctor import DataReport, Problem, decoded_size, lossy_mask
from seglab.data.files import read_raw_mask
from seglab.data.instance import InstanceFolder, InstanceFolderError

__all__ = ["check_instance_folder", "looks_like_instance_folder"]

SPLITS = ("train", "val", "test")


def looks_like_instance_folder(root: Path) -> bool:
    """One folder per split holding images/ and masks/, or class maps (classes/) beside them."""
    if any((root / split / "images").is_dir() and (root / split / "masks").is_dir() for split in SPLITS):
        return True
    return all((root / sub).is_dir() for sub in ("images", "masks", "classes"))


def check_instance_folder(root: Path) -> DataReport:
    """Check every split of the instance folder at `root` (see the module docstring)."""
    per_split = [split for split in SPLITS if (root / split / "images").is_dir()]
    report: DataReport | None = None
    for split in per_split or ["train", "val"]:
        try:
            dataset = InstanceFolder(root / split) if per_split else InstanceFolder(root, split=split)
        except InstanceFolderError as error:
            if report is None:
                report = DataReport(root, "instance", [], 0)
            report.problems.append(Problem(error.kind, root / split if per_split else root, str(error)))
            report.counts[split] = 0
            continue
        if report is None:
            report = DataReport(root, "instance", list(dataset.classes), 0, class_pixels=[0] * dataset.num_classes,
                                instances_per_class=[0] * dataset.num_classes)
        elif not report.classes:
            report.classes = list(dataset.classes)
            report.class_pixels = [0] * dataset.num_classes
            report.instances_per_class = [0] * dataset.num_classes
        report.counts[split] = len(dataset)
        for image_path, mask_path in dataset.pairs:
            class_path = dataset.class_dir / mask_path.name if dataset.class_dir is not None else None
            report.problems += _check_triple(image_path, mask_path, class_path, report)
    assert report is not None
    return report


def _read(path: Path) -> tuple[np.ndarray | None, str | None]:
    """The map as stored (seglab.data.files.read_raw_mask), or why it cannot be decoded."""
    try:
        return read_raw_mask(path), None
    except (OSError, SyntaxError, ValueError) as error:
        return None, f"cannot be decoded ({error})"


def _check_triple(image_path: Path, mask_path: Path, class_path: Path | None, report: DataReport) -> list[Problem]:
    """The problems of one image with its instance map (and class map), counting what it holds."""
    problems: list[Problem] = []
    image_size, problem = decoded_size(image_path)
    if problem:
        problems.append(problem)
    problems += [found for found in (lossy_mask(mask_path), class_path and lossy_mask(class_path)) if found]
    instances, error = _read(mask_path)
    if instances is None:
        return problems + [Problem("unreadable", mask_path, error)]
    if instances.ndim != 2:
        return problems + [Problem("unreadable", mask_path, f"has {instances.shape[2]} channels; an instance map has one")]
    height, width = instances.shape
    report.image_sizes[(width, height) if image_size is None else image_size] += 1
    if image_size is not None and image_size != (width, height):
        problems.append(Problem("size mismatch", mask_path, f"is {width}x{height} but its image {image_path.name} is "
                                                           f"{image_size[0]}x{image_size[1]} (W x H)"))
    classes = None
    if class_path is not None:
        if not class_path.is_file():
            problems.append(Problem("missing partner", class_path, f"no class map for {mask_path.name}"))
        else:
            classes, error = _read(class_path)
            if classes is None:
                problems.append(Problem("unreadable", class_path, error))
            elif classes.shape != instances.shape:
                problems.append(Problem("size mismatch", class_path, f"is {classes.shape[1]}x{classes.shape[0]} but its "
                                                                    f"instance map is {width}x{height} (W x H)"))
                classes = None
    ids = np.unique(instances)
    ids = ids[ids > 0]
    report.instances_per_image[len(ids)] += 1
    if not len(ids):
        problems.append(Problem("empty mask", mask_path, "has no instance (every pixel 0)"))
    num_classes = len(report.classes)
    labels = np.ones(instances.shape, np.int64) if classes is None else classes.astype(np.int64)
    unknown = np.unique(labels[(labels >= num_classes) | (labels < 0)])
    if len(unknown):
        problems.append(Problem("unknown label", class_path or mask_path,
                                f"has class values {', '.join(map(str, unknown[:8].tolist()))} outside 0..{num_classes - 1}"))
    # Every (instance, class) pair and its pixels in one pass over the map, sorted by instance
    # then class (a mask per instance would read the whole map once per instance).
    inside = instances > 0
    span = int(labels.max()) + 1 if labels.size else 1
    pairs, pixels = np.unique(instances[inside].astype(np.int64) * span + labels[inside], return_counts=True)
    mixed = []
    for instance in ids.tolist():
        mine = (pairs // span) == instance
        values, counts = pairs[mine] % span, pixels[mine]
        label = int(values[np.argmax(counts)])  # the label training reads: the most frequent class under it
        if 0 < label < num_classes:
            report.instances_per_class[label] += 1
        if len(values) > 1 or label == 0:
            mixed.append(f"{instance} ({', '.join(f'class {v}: {c} px' for v, c in zip(values.tolist(), counts.tolist()))})")
    if mixed:
        problems.append(Problem("mixed instance", class_path or mask_path,
                                f"{len(mixed)} instance(s) not of one object class: {'; '.join(mixed[:3])}"))
    valid = (labels >= 0) & (labels < num_classes)
    foreground = np.where(instances > 0, labels, 0)[valid]
    report.class_pixels = [total + int(n) for total, n in
                           zip(report.class_pixels, np.bincount(foreground.ravel(), minlength=num_classes))]
    return problems
