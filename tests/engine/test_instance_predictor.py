"""InstancePredictor: detections in score order, the instance / class maps it writes (readable as an
instance folder data set), batching, and the overlay."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.data.instance import InstanceFolder
from seglab.engine.checkpoint import save_checkpoint
from seglab.engine.instance_predictor import InstancePredictor, instance_maps, instance_overlay, sorted_detections
from seglab.models import create_model

CLASSES = ["background", "a", "b"]


def _detections(scores: list[float], boxes: list[tuple[int, int, int, int]], labels: list[int], size=(20, 20)) -> dict[str, torch.Tensor]:
    masks = torch.zeros(len(scores), 1, *size)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes):
        mask[0, y1:y2, x1:x2] = 0.9
    return {"masks": masks, "boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
            "scores": torch.tensor(scores)}


def test_detections_are_sorted_by_score_and_cut_at_the_threshold() -> None:
    found = sorted_detections(_detections([0.3, 0.9, 0.6, 0.05], [(0, 0, 4, 4), (5, 5, 9, 9), (10, 10, 14, 14), (0, 10, 3, 13)],
                                          [1, 2, 1, 2]), score_threshold=0.3)
    assert found["scores"].tolist() == pytest.approx([0.9, 0.6, 0.3])  # 0.3 is kept: at or above
    assert found["labels"].tolist() == [2, 1, 1] and found["boxes"][0].tolist() == [5, 5, 9, 9]
    assert found["masks"].dtype == torch.bool and found["masks"].shape == (3, 20, 20) and found["masks"][0, 6, 6]


def test_already_sorted_detections_are_kept_as_a_leading_slice() -> None:
    # The models' own order: the kept detections are read in place, not gathered anew.
    prediction = _detections([0.9, 0.6, 0.3, 0.05], [(0, 0, 4, 4), (5, 5, 9, 9), (10, 10, 14, 14), (0, 10, 3, 13)], [2, 1, 1, 2])
    found = sorted_detections(prediction, score_threshold=0.3)
    assert found["scores"].tolist() == pytest.approx([0.9, 0.6, 0.3]) and found["labels"].tolist() == [2, 1, 1]
    assert found["boxes"].data_ptr() == prediction["boxes"].data_ptr()
    assert torch.equal(found["masks"], prediction["masks"][:3, 0] > 0.5) and found["masks"].dtype == torch.bool
    bf16 = sorted_detections({**prediction, "masks": prediction["masks"].bfloat16(), "scores": prediction["scores"].bfloat16()})
    assert bf16["scores"].dtype == torch.float32 and torch.equal(bf16["masks"], prediction["masks"][:, 0] > 0.5)


def test_instance_maps_number_detections_by_score_and_the_higher_score_keeps_an_overlap() -> None:
    found = sorted_detections(_detections([0.5, 0.9], [(0, 0, 10, 10), (5, 5, 15, 15)], [1, 2]))
    instances, classes = instance_maps(found, (20, 20))
    assert instances.dtype == np.uint16 and classes.dtype == np.uint8
    assert instances[7, 7] == 1 and classes[7, 7] == 2  # the overlap: the 0.9 detection, numbered first
    assert instances[2, 2] == 2 and classes[2, 2] == 1
    assert instances[18, 18] == 0 and classes[18, 18] == 0
    assert sorted(np.unique(instances).tolist()) == [0, 1, 2]
    many = sorted_detections(_detections([0.5] * 300, [(k % 20, k // 20, k % 20 + 1, k // 20 + 1) for k in range(300)], [1] * 300))
    assert instance_maps(many, (20, 20))[0].max() == 300  # beyond 8 bits


def test_overlay_colours_each_instance_and_skips_low_scores() -> None:
    image = torch.zeros(3, 20, 20)
    prediction = _detections([0.9, 0.8, 0.1], [(2, 2, 8, 8), (10, 10, 18, 18), (12, 2, 18, 8)], [1, 1, 2])
    picture = instance_overlay(image, prediction, CLASSES, score_threshold=0.5)
    assert picture.shape == (20, 20, 3)
    first, second = picture[5, 5], picture[14, 14]
    assert first.any() and second.any() and not np.array_equal(first, second)  # one colour per instance
    assert not picture[5, 15].any()  # the 0.1-score instance is not drawn


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Mask R-CNN (its class scores near 1/3, above its 0.05 box threshold), saved as a checkpoint."""
    torch.manual_seed(0)
    kwargs = dict(encoder="resnet10t", fpn_channels=32, anchor_size=8, min_size=0, proposals=30, detections_per_image=6,
                  num_classes=3)
    model = create_model("mask_rcnn", **kwargs).eval()
    path = tmp_path_factory.mktemp("run") / "best"
    save_checkpoint(path, model, {"model": "mask_rcnn", "task": "instance", "kwargs": kwargs, "classes": CLASSES})
    return path


def _pictures(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index, (height, width) in enumerate(sizes):
        files.append(folder / f"p{index}.png")
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(files[-1])
    return files


def test_written_maps_are_the_detections_and_read_back_as_an_instance_folder(checkpoint: Path, tmp_path: Path) -> None:
    predictor = InstancePredictor.from_checkpoint(checkpoint, device="cpu", precision="32", score_threshold=0.0)
    files = _pictures(tmp_path / "images", [(48, 64), (48, 64)])
    written = predictor.predict_files([tmp_path / "images"], tmp_path / "out", overlays=False)
    assert sorted(p.name for p in written) == ["images.json", "p0_classes.png", "p0_instances.png", "p1_classes.png",
                                               "p1_instances.png", "results.json"]
    found = predictor.predict(Image.open(files[0]))
    assert len(found["scores"]) > 0 and found["scores"].tolist() == sorted(found["scores"].tolist(), reverse=True)
    records = [r for r in json.loads((tmp_path / "out" / "results.json").read_text()) if r["image_id"] == 1]
    assert [r["score"] for r in records] == pytest.approx(found["scores"].tolist(), abs=1e-6)
    # the layout InstanceFolder reads: images/, masks/ (instance indices), classes/ (class indices)
    folder = tmp_path / "folder"
    for sub, suffix in (("images", None), ("masks", "_instances"), ("classes", "_classes")):
        (folder / sub).mkdir(parents=True)
        for file in files:
            shutil.copy(file if suffix is None else tmp_path / "out" / f"{file.stem}{suffix}.png", folder / sub / f"{file.stem}.png")
    _, target = InstanceFolder(folder, classes=CLASSES)[0]
    expected_instances, expected_classes = instance_maps(found, (48, 64))
    visible = [k for k in range(1, len(found["scores"]) + 1) if (expected_instances == k).any()]
    assert len(target["masks"]) == len(visible) > 0
    for mask, label, k in zip(target["masks"], target["labels"], visible):
        assert np.array_equal(mask.numpy().astype(bool), expected_instances == k)
        assert int(label) == int(found["labels"][k - 1])


def test_batches_of_equal_size_give_the_detections_of_single_images(checkpoint: Path, tmp_path: Path) -> None:
    files = _pictures(tmp_path / "images", [(40, 56), (40, 56), (32, 48)])
    outputs = {}
    for batch_size in (1, 2):
        predictor = InstancePredictor.from_checkpoint(checkpoint, device="cpu", precision="32", batch_size=batch_size)
        predictor.predict_files(files, tmp_path / f"b{batch_size}", overlays=False)
        outputs[batch_size] = json.loads((tmp_path / f"b{batch_size}" / "results.json").read_text())
    assert [r["image_id"] for r in outputs[1]] == [r["image_id"] for r in outputs[2]] and len(outputs[1]) > 0
    assert [r["score"] for r in outputs[1]] == pytest.approx([r["score"] for r in outputs[2]], abs=1e-4)


def test_an_unreadable_image_raises_or_is_skipped_and_left_out_of_the_index(checkpoint: Path, tmp_path: Path) -> None:
    files = _pictures(tmp_path / "images", [(40, 56), (40, 56)])
    broken = tmp_path / "images" / "p0b.png"
    broken.write_bytes(b"\x89PNG truncated")
    predictor = InstancePredictor.from_checkpoint(checkpoint, device="cpu", precision="32")
    with pytest.raises(ValueError, match="p0b.png is not a readable image"):
        predictor.predict_files([tmp_path / "images"], tmp_path / "raised", overlays=False)
    unreadable: list = []
    written = predictor.predict_files([tmp_path / "images"], tmp_path / "out", overlays=False, unreadable=unreadable)
    assert [path for path, _ in unreadable] == [broken]
    assert sum(p.name.endswith("_instances.png") for p in written) == 2
    index = json.loads((tmp_path / "out" / "images.json").read_text())
    assert [(entry["id"], entry["file_name"]) for entry in index] == [(1, str(files[0])), (3, str(files[1]))]
    assert {r["image_id"] for r in json.loads((tmp_path / "out" / "results.json").read_text())} <= {1, 3}


def test_wrong_checkpoints_and_options_are_refused_with_one_line(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8 is for semantic models"):
        InstancePredictor.from_checkpoint(checkpoint, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="--score-threshold must lie in"):
        InstancePredictor.from_checkpoint(checkpoint, device="cpu", score_threshold=1.5)
    semantic = tmp_path / "semantic"
    save_checkpoint(semantic, create_model("unet", num_classes=2, base_channels=4, depth=2),
                    {"model": "unet", "kwargs": {"num_classes": 2, "base_channels": 4, "depth": 2}, "classes": ["x", "y"]})
    with pytest.raises(ValueError, match="this predictor is for instance models"):
        InstancePredictor.from_checkpoint(semantic)


def test_two_processes_write_the_records_of_one(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from seglab.engine.distributed import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _pictures(tmp_path / "images", [(40, 56), (32, 48), (40, 56)])
    command = ["predict", "--checkpoint", f"{checkpoint}.safetensors", str(tmp_path / "images"), "--precision", "32", "--no-overlays"]
    assert launch(2, [*command, "--out", str(tmp_path / "two")]) == 0
    InstancePredictor.from_checkpoint(checkpoint, device="cpu", precision="32").predict_files(
        [tmp_path / "images"], tmp_path / "one", overlays=False)
    one, two = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two"))
    assert sorted({r["image_id"] for r in two}) == [1, 2, 3]  # both ranks' shards, gathered by rank 0
    assert [r["image_id"] for r in two] == [r["image_id"] for r in one]
    assert [r["score"] for r in two] == pytest.approx([r["score"] for r in one], abs=1e-4)  # threads: rounding only
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_results_carry_the_training_files_category_ids(checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint trained on a COCO file with sparse category ids (here 3 and 7) writes its
    results in those ids, so the file's own tools can score them."""
    from seglab.engine.checkpoint import load_checkpoint

    model, config = load_checkpoint(checkpoint)
    _pictures(tmp_path / "images", [(40, 56)])
    predictor = InstancePredictor(model, {**config, "category_ids": [3, 7]}, "cpu", precision="32")
    predictor.predict_files([tmp_path / "images"], tmp_path / "out", overlays=False)
    found = predictor.predict(Image.open(tmp_path / "images" / "p0.png"))
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(records) > 0 and {r["category_id"] for r in records} <= {3, 7}
    shown = [r for r in records if r["score"] >= predictor.score_threshold]
    assert [r["category_id"] for r in shown] == [{1: 3, 2: 7}[int(label)] for label in found["labels"]]


def test_eval_refuses_data_of_another_class_count(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    from seglab.cli import main

    # the checkpoint has 2 object classes; the built-in synthetic shapes 5
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", "synthetic", "--precision", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("seglab: error: the val split of synthetic has 6 classes (background, circle, square, triangle, ellipse, "
                   "star) but the checkpoint predicts 3 (background, a, b): score it on data with its classes")


def test_auto_runs_the_cpus_native_precision(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Float32 on CPUs without AMX until the bf16 fast path stopped running float32's convolutions.
    import seglab.engine.instance_predictor as module

    cpu = torch.device("cpu")
    monkeypatch.setattr(module, "auto_precision", lambda device: "32")  # no native bf16
    assert module.auto_instance_precision(cpu) == "32"
    assert InstancePredictor.from_checkpoint(checkpoint, device="cpu").precision == "32"
    monkeypatch.setattr(module, "auto_precision", lambda device: "bf16")  # AVX-512 BF16 or AMX
    assert module.auto_instance_precision(cpu) == "bf16"
