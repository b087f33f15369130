"""The data doctor on instance folders: instances per class and per image, and every problem
named with its file."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image
from rich.console import Console

from seglab.cli import main
from seglab.data.doctor import check_dataset, render_report


def _write(root, name, instances, classes, image_size=None):
    height, width = instances.shape if image_size is None else image_size
    for sub in ("images", "masks", "classes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / "images" / f"{name}.png")
    Image.fromarray(instances.astype(np.uint16)).save(root / "masks" / f"{name}.png")
    Image.fromarray(classes.astype(np.uint8)).save(root / "classes" / f"{name}.png")


def _scene(count):
    """`count` square instances, instance k of class 1 + (k % 2)."""
    instances, classes = np.zeros((16, 40), np.int64), np.zeros((16, 40), np.int64)
    for k in range(1, count + 1):
        instances[2:6, 4 * k:4 * k + 3] = k
        classes[2:6, 4 * k:4 * k + 3] = 1 + k % 2
    return instances, classes


def test_a_clean_instance_folder_is_told_from_a_semantic_one_and_counted(tmp_path):
    (tmp_path / "classes.yaml").write_text("classes: [background, cat, dog]\n")
    for split, counts in (("train", (1, 2, 3)), ("val", (2,))):
        for index, count in enumerate(counts):
            _write(tmp_path / split, f"{split}{index}", *_scene(count))
    report = check_dataset(tmp_path)
    assert report.ok and report.format == "instance" and report.counts == {"train": 3, "val": 1}
    assert report.classes == ["background", "cat", "dog"]
    # instance k is a cat for even k, a dog for odd k: scenes of 1, 2, 3 and 2 instances
    assert report.instances_per_class == [0, 3, 5]
    assert report.instances_per_image == {1: 1, 2: 2, 3: 1}
    assert report.class_pixels[1:] == [3 * 12, 5 * 12]  # 4 x 3 pixels each
    console = Console(record=True, width=120)
    render_report(report, console)
    shown = console.export_text()
    assert "format: instance" in shown and "instances per image" in shown and "no problems found" in shown
    assert not report.note  # class maps: an instance folder beyond doubt


def test_one_folder_per_split_without_class_maps_says_how_to_read_it_as_a_semantic_folder(tmp_path):
    from seglab.data.doctor import preflight

    for split in ("train", "val"):
        for sub, pixels in (("images", np.full((8, 8, 3), 90)), ("masks", np.tile(np.arange(8) % 3, (8, 1)))):
            (tmp_path / split / sub).mkdir(parents=True)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / split / sub / "a.png")
    report = check_dataset(tmp_path)
    assert report.format == "instance" and "--format folder" in report.note and json.loads(json.dumps(report.to_dict()))["note"]
    semantic = check_dataset(tmp_path, format="folder")
    assert semantic.ok and semantic.counts == {"train": 1, "val": 1} and len(semantic.classes) == 3 and not semantic.note
    assert preflight(tmp_path) == []  # semantic training reads the layout as the folder format
    (tmp_path / "val" / "masks" / "a.png").unlink()
    assert any("--format folder" in line for line in preflight(tmp_path))


def test_each_problem_of_an_instance_folder_names_its_file(tmp_path):
    (tmp_path / "classes.yaml").write_text("classes: [background, cat, dog]\n")
    train = tmp_path / "train"
    _write(train, "good", *_scene(2))
    instances, classes = _scene(2)
    classes[2:4, 4:7] = 1  # instance 1 (a dog): half of it cat
    _write(train, "mixed", instances, classes)
    _write(train, "empty", np.zeros((16, 40)), np.zeros((16, 40)))
    _write(train, "small", *_scene(1), image_size=(20, 40))
    instances, classes = _scene(1)
    classes[classes > 0] = 7  # no class 7
    _write(train, "unknown", instances, classes)
    report = check_dataset(tmp_path, format="instance")
    found = {(p.kind, p.file.name) for p in report.problems}
    assert found == {("mixed instance", "mixed.png"), ("empty mask", "empty.png"), ("size mismatch", "small.png"),
                     ("unknown label", "unknown.png")}
    out = tmp_path / "report.json"
    assert main(["data", "check", str(tmp_path), "--json", str(out)]) == 1
    written = json.loads(out.read_text())
    assert written["format"] == "instance" and written["instances_per_class"]["cat"] >= 1


def test_class_maps_without_names_are_one_problem(tmp_path):
    _write(tmp_path / "train", "a", *_scene(2))
    report = check_dataset(tmp_path)
    assert [p.kind for p in report.problems] == ["no class names"]


def test_a_split_that_cannot_be_opened_is_named_by_the_folders_own_error_kind(tmp_path):
    (tmp_path / "classes.yaml").write_text("classes: [background, cat, dog]\n")
    _write(tmp_path / "train", "a", *_scene(2))
    _write(tmp_path / "val", "b", *_scene(1))
    (tmp_path / "val" / "masks" / "b.png").unlink()  # val's image without its instance map
    for sub in ("images", "masks"):
        (tmp_path / "test" / sub).mkdir(parents=True)  # a split with no image
    report = check_dataset(tmp_path, format="instance")
    assert sorted((p.kind, p.file.name) for p in report.problems) == [("empty split", "test"), ("missing partner", "val")]
    assert report.counts == {"train": 1, "val": 0, "test": 0}


def test_an_instance_map_stored_as_jpeg_is_a_lossy_mask(tmp_path):
    _write(tmp_path / "train", "a", *_scene(2))
    (tmp_path / "classes.yaml").write_text("classes: [background, cat, dog]\n")
    instances, _ = _scene(1)
    Image.fromarray(instances.astype(np.uint8)).save(tmp_path / "train" / "masks" / "a.jpg")
    (tmp_path / "train" / "masks" / "a.png").unlink()
    report = check_dataset(tmp_path, format="instance")
    assert ("lossy mask", "a.jpg") in {(p.kind, p.file.name) for p in report.problems}
