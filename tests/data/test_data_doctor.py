"""The data doctor finds every kind of problem, names the file, and passes clean data."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from rich.console import Console

from seglab.data.doctor import check_dataset, preflight, render_report


@pytest.fixture
def clean(tmp_path, helpers, rng):
    (tmp_path / "classes.yaml").write_text("classes: [road, car, sky]\n")
    for k in range(4):
        image, labels = helpers.pair(rng, values=(0, 1, 2, 255))
        helpers.rgb(tmp_path / "images" / f"ok{k}.png", image)
        helpers.index(tmp_path / "masks" / f"ok{k}.png", labels)
    return tmp_path


def test_clean_data_reports_counts_sizes_and_histograms(clean):
    report = check_dataset(clean)
    assert report.ok and report.format == "folder" and preflight(clean) == []
    assert sum(report.counts.values()) == 4
    assert report.image_sizes == {(16, 12): 4}
    assert sum(report.label_histogram.values()) == 4 * 12 * 16
    assert set(report.label_histogram) <= {0, 1, 2, 255}
    assert sum(report.class_pixels) + report.ignored_pixels == 4 * 12 * 16
    assert sum(report.class_frequencies) == pytest.approx(1.0)
    assert report.to_dict()["class_pixels"]["road"] == report.class_pixels[0]


def test_every_problem_is_found_with_its_file(clean, helpers, rng):
    root = clean
    image, labels = helpers.pair(rng)
    helpers.rgb(root / "images" / "lonely.png", image)  # no mask
    helpers.index(root / "masks" / "ghost.png", labels)  # no image
    helpers.rgb(root / "images" / "small.png", image)
    helpers.index(root / "masks" / "small.png", labels[:6])  # size mismatch
    helpers.rgb(root / "images" / "seven.png", image)
    helpers.index(root / "masks" / "seven.png", np.where(labels == 2, 7, labels))  # unknown label 7
    helpers.rgb(root / "images" / "blank.png", image)
    helpers.index(root / "masks" / "blank.png", np.full_like(labels, 255))  # nothing labelled
    helpers.rgb(root / "images" / "cut.png", image)
    helpers.index(root / "masks" / "cut.png", labels)
    data = (root / "images" / "cut.png").read_bytes()
    (root / "images" / "cut.png").write_bytes(data[: len(data) // 2])  # truncated
    helpers.rgb(root / "images" / "junk.png", image)
    (root / "masks" / "junk.png").write_bytes(b"not a png at all")  # corrupt

    report = check_dataset(root)
    found = {(p.kind, p.file.name) for p in report.problems}
    assert found == {
        ("missing partner", "lonely.png"),
        ("missing partner", "ghost.png"),
        ("size mismatch", "small.png"),
        ("unknown label", "seven.png"),
        ("empty mask", "blank.png"),
        ("unreadable", "cut.png"),
        ("unreadable", "junk.png"),
    }
    assert "7" in next(p.detail for p in report.problems if p.kind == "unknown label")
    lines = preflight(root)
    assert len(lines) == 5 + 1  # one per kind (5 kinds here), and where to look for the full list
    assert any(line.startswith("unreadable: 2 (corrupt or truncated") for line in lines)
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    assert "seven.png" in text and "size mismatch" in text


def test_masks_stored_as_jpeg_are_a_problem_that_stops_training(clean, helpers, rng):
    """A 0/1/2 mask saved as JPEG reads back with other values along its edges, each of which
    the folder format would take for a class of its own."""
    from PIL import Image

    labels = np.zeros((32, 32), np.uint8)
    labels[4:20, 4:20], labels[16:30, 14:30] = 1, 2
    helpers.rgb(clean / "images" / "photo.png", rng.integers(0, 256, size=(32, 32, 3)))
    Image.fromarray(labels).save(clean / "masks" / "photo.jpg")
    assert set(np.unique(np.asarray(Image.open(clean / "masks" / "photo.jpg")))) - {0, 1, 2}  # smeared
    report = check_dataset(clean)
    assert ("lossy mask", "photo.jpg") in {(p.kind, p.file.name) for p in report.problems}
    assert any(line.startswith("lossy mask: 1 (masks stored as JPEG") for line in preflight(clean))


def test_binary_masks_with_their_foreground_at_255_are_one_class_and_stop_training(tmp_path, helpers, rng):
    """255 is the ignore value: 0/255 masks leave one class to learn, which trains a model that
    answers background everywhere."""
    for k in range(3):
        labels = np.zeros((12, 16), np.uint8)
        labels[2:8, 3:9] = 255
        helpers.rgb(tmp_path / "images" / f"{k}.png", rng.integers(0, 256, size=(12, 16, 3)))
        helpers.index(tmp_path / "masks" / f"{k}.png", labels)
    report = check_dataset(tmp_path)
    (problem,) = report.problems
    assert problem.kind == "one class" and "every labelled pixel is class_0" in problem.detail
    assert "hold 255, the ignore value" in problem.detail and "store it as 1" in problem.detail
    assert preflight(tmp_path)[0].startswith("one class: 1")
    assert not check_dataset(tmp_path, splits=["val"]).problems  # a split alone may hold one class
    for k in range(3):  # stored as 0/1, the same masks are fit to train
        helpers.index(tmp_path / "masks" / f"{k}.png", np.where(helpers.pair(rng)[1] > 0, 1, 0))
    assert preflight(tmp_path) == []


def test_preflight_for_batches_of_images_as_they_are_wants_one_size(clean, helpers, rng):
    assert preflight(clean, one_size=True) == []  # all 16 x 12
    image, labels = helpers.pair(rng, height=20, width=10, values=(0, 1))
    helpers.rgb(clean / "images" / "wide.png", image)
    helpers.index(clean / "masks" / "wide.png", labels)
    assert preflight(clean) == []  # fit to train at a given --image-size
    lines = preflight(clean, one_size=True)
    assert lines[0].startswith("image sizes: 2 different (most common 16x12, 10x20)") and "--image-size" in lines[0]


def test_unknown_colours_in_rgb_masks(tmp_path, helpers, rng):
    (tmp_path / "classes.yaml").write_text("classes: {sky: [0, 0, 255], road: [128, 64, 128]}\n")
    colours = np.array([(0, 0, 255), (128, 64, 128), (255, 0, 0)])
    helpers.rgb(tmp_path / "images" / "a.png", rng.integers(0, 256, size=(8, 8, 3)))
    helpers.rgb(tmp_path / "masks" / "a.png", colours[rng.integers(0, 3, size=(8, 8))])
    report = check_dataset(tmp_path)
    (problem,) = report.problems
    assert problem.kind == "unknown colour" and "(255, 0, 0)" in problem.detail
    assert all(isinstance(key, str) and key.startswith("#") for key in report.label_histogram)


def test_missing_folder_and_unknown_format_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        check_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'kitti'"):
        check_dataset(tmp_path, format="kitti")


def test_coco_sets_are_checked_image_by_image(tmp_path, helpers, rng):
    import json

    helpers.rgb(tmp_path / "images" / "a.png", rng.integers(0, 256, size=(10, 10, 3)))
    helpers.rgb(tmp_path / "images" / "b.png", rng.integers(0, 256, size=(10, 12, 3)))
    square = [[2, 2, 6, 2, 6, 6, 2, 6]]
    content = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 10, "width": 10},
            {"id": 2, "file_name": "b.png", "height": 10, "width": 10},  # really 12 wide
            {"id": 3, "file_name": "gone.png", "height": 10, "width": 10},
        ],
        "categories": [{"id": 1, "name": "cell"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 16, "bbox": [2, 2, 4, 4], "segmentation": square},
            {"id": 2, "image_id": 1, "category_id": 9, "iscrowd": 0, "area": 16, "bbox": [2, 2, 4, 4], "segmentation": square},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(content))
    report = check_dataset(tmp_path)
    assert report.format == "coco" and report.counts == {"instances.json": 3}
    assert {(p.kind, p.file.name) for p in report.problems} == {
        ("unknown label", "instances.json"),
        ("size mismatch", "b.png"),
        ("missing partner", "gone.png"),
    }


def test_cli_data_check_exit_codes(clean, helpers, rng, tmp_path_factory, capsys):
    from seglab.cli import main

    assert main(["data", "check", str(clean)]) == 0
    assert "no problems found" in capsys.readouterr().out
    report_file = tmp_path_factory.mktemp("report") / "report.json"
    helpers.index(clean / "masks" / "ok0.png", np.full((12, 16), 9))
    assert main(["data", "check", str(clean), "--format", "folder", "--json", str(report_file)]) == 1
    assert "ok0.png" in capsys.readouterr().out and "unknown label" in report_file.read_text()
    assert main(["data", "check", str(clean / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_train_refuses_bad_data_with_one_line_per_kind(clean, helpers, rng, capsys):
    from seglab.cli import main

    for name in ("a", "b"):
        helpers.rgb(clean / "images" / f"{name}.png", rng.integers(0, 256, size=(12, 16, 3)))
        helpers.index(clean / "masks" / f"{name}.png", np.full((12, 16), 7))
    helpers.rgb(clean / "images" / "alone.png", rng.integers(0, 256, size=(12, 16, 3)))
    code = main(["train", "--data", str(clean), "--epochs", "1", "--out", str(clean / "runs")])
    error = capsys.readouterr().err
    assert code == 2 and "not fit to train on" in error
    assert "unknown label: 2 (masks with label values outside the classes" in error
    assert "missing partner: 1 (files without their image or mask partner)" in error
    assert not (clean / "runs").exists()


def test_train_runs_on_a_clean_folder_data_set(clean, capsys):
    from seglab.cli import main

    code = main(["train", "--data", str(clean), "--epochs", "1", "--image-size", "16", "--batch-size", "2", "--out", str(clean / "runs")])
    assert code == 0, capsys.readouterr().err
    assert list((clean / "runs").glob("*/metrics.jsonl"))


def test_coco_sets_count_their_objects_by_class_and_by_image_crowds_left_out(tmp_path, helpers, rng):
    import json

    from seglab.data.doctor import _instance_bins

    for name in ("a.png", "b.png"):
        helpers.rgb(tmp_path / "images" / name, rng.integers(0, 256, size=(10, 10, 3)))
    square = [[2, 2, 6, 2, 6, 6, 2, 6]]
    objects = [(1, 1, 0), (1, 1, 1), (2, 1, 0), (2, 5, 0)]  # (image, category, crowd)
    content = {
        "images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}, {"id": 2, "file_name": "b.png", "height": 10, "width": 10}],
        "categories": [{"id": 1, "name": "cell"}, {"id": 5, "name": "debris"}],
        "annotations": [{"id": k, "image_id": image, "category_id": category, "iscrowd": crowd, "area": 16, "bbox": [2, 2, 4, 4],
                         "segmentation": square} for k, (image, category, crowd) in enumerate(objects, start=1)],
    }
    (tmp_path / "instances.json").write_text(json.dumps(content))
    report = check_dataset(tmp_path)
    assert report.ok and report.instances_per_class == [0, 2, 1] and report.instances_per_image == {1: 1, 2: 1}
    assert report.to_dict()["instances_per_class"] == {"background": 0, "cell": 2, "debris": 1}
    # many different counts are shown in doubling bins
    many = Counter({count: 1 for count in range(0, 40, 3)})
    assert _instance_bins(many) == [("0", 1), ("2-3", 1), ("4-7", 1), ("8-15", 3), ("16-31", 5), ("32-63", 3)]


def test_coco_keypoint_files_are_checked_for_their_keypoints(tmp_path, helpers, rng, capsys):
    # Before, a keypoint file without masks ended the doctor with "seglab: error: segmentation".
    import json

    from seglab.cli import main

    for name in ("a.png", "b.png"):
        helpers.rgb(tmp_path / "images" / name, rng.integers(0, 256, size=(10, 10, 3)))
    fine = [2, 3, 2, 5, 5, 1, 0, 0, 0]  # three keypoints: visible, hidden, not labelled
    annotations = [
        (1, fine, 2),
        (1, fine[:6], 2),                        # six values for three keypoints
        (2, [2, 3, 2, 5, 5, 3, 0, 0, 0], 2),     # visibility 3
        (2, [2, 3, 2, 12, 5, 1, 0, 0, 0], 2),    # a labelled keypoint right of the 10-pixel image
        (2, fine, 3),                            # num_keypoints counts three, two are labelled
    ]
    content = {
        "images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}, {"id": 2, "file_name": "b.png", "height": 10, "width": 10}],
        "categories": [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", "right_eye"], "skeleton": [[1, 2]]}],
        "annotations": [{"id": k, "image_id": image, "category_id": 1, "iscrowd": 0, "area": 16, "bbox": [1, 1, 6, 6],
                         "keypoints": points, "num_keypoints": count}
                        for k, (image, points, count) in enumerate(annotations, start=1)],
    }
    (tmp_path / "person_keypoints.json").write_text(json.dumps(content))
    report = check_dataset(tmp_path)
    assert "COCO keypoint file (3 keypoints per object)" in report.note and report.instances_per_class == [0, 5]
    assert sorted(p.detail.split(" has ")[-1].split(" says ")[-1] for p in report.problems if p.kind == "bad keypoints") == [
        "6 keypoint values; its category's 3 keypoints need 9",
        "labelled keypoints outside its 10x10 image",
        "num_keypoints 3 but labels 2",
        "visibility values [3.0], not 0, 1 or 2",
    ]
    assert {p.kind for p in report.problems} == {"bad keypoints"}  # no masks to train is no problem for keypoints
    assert main(["data", "check", str(tmp_path)]) == 1 and "bad keypoints: 4" in capsys.readouterr().out

    # a mask-less object of an instance file is a problem, and the instance reader names it
    from seglab.data.coco import CocoInstances

    content["categories"] = [{"id": 1, "name": "cell"}]
    for annotation in content["annotations"]:
        del annotation["keypoints"], annotation["num_keypoints"]
    (tmp_path / "person_keypoints.json").write_text(json.dumps(content))
    assert {p.kind for p in check_dataset(tmp_path).problems} == {"no segmentation"}
    with pytest.raises(ValueError, match="annotation 1 in person_keypoints.json has no segmentation to train masks on"):
        CocoInstances(tmp_path / "person_keypoints.json")[0]
