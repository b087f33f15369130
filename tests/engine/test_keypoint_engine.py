"""`seglab train --task keypoint`, `seglab eval` and `seglab predict` with a Keypoint R-CNN
checkpoint, end to end (tiny), and the keypoint trainer's learning and refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.cli import main
from seglab.engine.checkpoint import load_checkpoint

TINY = ["--encoder", "resnet10t", "--image-size", "64", "--train-samples", "4", "--val-samples", "2", "--batch-size", "2"]


def test_train_eval_predict_a_keypoint_model(tmp_path, capsys):
    code = main(["train", "--task", "keypoint", *TINY, "--epochs", "1", "--out", str(tmp_path), "--name", "tiny"])
    assert code == 0
    run = tmp_path / "tiny"
    for name in ("best.safetensors", "best.json", "last.safetensors", "metrics.jsonl", "config.yaml", "resume.pt",
                 "overlays/val_000.png"):
        assert (run / name).is_file(), name
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"ap", "ap50", "ap75", "apm", "apl", "ar", "train_loss", "train_loss_keypoint"} <= set(row)
    assert "boundary_ap" not in row
    model, config = load_checkpoint(run)
    assert config["task"] == "keypoint" and config["model"] == "keypoint_rcnn"
    names = ["head", "neck", "hip", "left_hand", "right_hand", "left_foot", "right_foot"]
    assert config["keypoint_names"] == names and len(config["sigmas"]) == 7 and [0, 1] in config["skeleton"]
    # the defaults' narrow heads, and the keypoint count from the data
    assert config["kwargs"]["num_keypoints"] == 7 and config["kwargs"]["head_channels"] == 128
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 7
    printed = capsys.readouterr()
    assert "keypoint AP" in printed.out and "Best validation keypoint AP" in printed.out

    metrics_file = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(run), "--json", str(metrics_file)]) == 0
    assert "keypoint AP" in capsys.readouterr().out
    assert {"ap", "ap50", "ar"} <= set(json.loads(metrics_file.read_text()))
    records = json.loads(metrics_file.with_suffix(".results.json").read_text())
    assert all(len(r["keypoints"]) == 21 for r in records)

    image_file = tmp_path / "picture.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(image_file)
    out = tmp_path / "predicted"
    assert main(["predict", "--checkpoint", str(run), str(image_file), "--out", str(out), "--score-threshold", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["images.json", "picture_keypoints.json", "picture_overlay.png",
                                                      "results.json"]
    with Image.open(out / "picture_overlay.png") as overlay:
        assert overlay.size == (56, 40)
    found = json.loads((out / "picture_keypoints.json").read_text())
    assert found["keypoint_names"] == names
    records = json.loads((out / "results.json").read_text())
    assert len(found["detections"]) == len(records)  # threshold 0: every detection in both
    for detection in found["detections"]:
        assert len(detection["keypoints"]) == 7 and detection["class"] == "figure" and len(detection["box"]) == 4
    assert "1 image(s) predicted" in capsys.readouterr().out

    # semantic-only options: one line each, naming the task
    assert main(["predict", "--checkpoint", str(run), str(image_file), "--out", str(out), "--tile", "32"]) == 2
    assert main(["eval", "--checkpoint", str(run), "--crf"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"seglab: error: --tile: for semantic models only; {run} is a keypoint model",
                      f"seglab: error: --crf: for semantic models only; {run} is a keypoint model"]

    # --image-size sizes the synthetic set it is scored on (refused before 2026-12-07's later session)
    import seglab.engine.keypoints as keypoints

    opened = []
    real_open = keypoints.open_keypoint_dataset
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keypoints, "open_keypoint_dataset", lambda *a, **o: opened.append(real_open(*a, **o)) or opened[-1])
        assert main(["eval", "--checkpoint", str(run), "--image-size", "96x80"]) == 0
    assert opened[0][0][0].shape == (3, 80, 96) and "val split of synthetic (2 images)" in capsys.readouterr().out

    # resumed with more epochs, it goes on from epoch 2
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_the_keypoint_head_learns_one_batch():
    """A few steps on one batch bring the keypoint loss down: the targets reach the head."""
    from seglab.data.instance import collate_instances
    from seglab.data.keypoints import SyntheticPoses
    from seglab.engine.instance import model_kwargs_for
    from seglab.models import create_model

    torch.manual_seed(0)
    data = SyntheticPoses(num_samples=2, image_size=64)
    images, targets = collate_instances([data[0], data[1]])
    kwargs = model_kwargs_for("keypoint_rcnn", 64, {"fpn_channels": 32, "head_channels": 32, "box_head_width": 64})
    model = create_model("keypoint_rcnn", encoder="resnet10t", num_keypoints=7, **kwargs).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = model(images, targets)
        losses.append(float(loss["loss_keypoint"].detach()))
        optimiser.zero_grad()
        sum(loss.values()).backward()
        optimiser.step()
    assert min(losses[-3:]) < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-classes", "3"], "--num-classes: the synthetic keypoint set has one class"),
        (["--format", "coco"], "--format coco describes a --data folder; the built-in synthetic set has no layout"),
        (["--model-option", "num_keypoints=17"], "num_keypoints=17: the data set's objects have 7 keypoints"),
        (["--loss", "dice"], "--loss is an option of semantic training"),
        (["--nproc", "2"], "--nproc: keypoint training runs in one process"),
        (["--model", "mask_rcnn"], "--model mask_rcnn is an instance model, not a keypoint one"),
    ],
)
def test_keypoint_training_refuses_what_it_cannot_do_in_one_line(tmp_path, capsys, options, message):
    assert main(["train", "--task", "keypoint", *TINY, "--epochs", "1", "--out", str(tmp_path), *options]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and message in errors[0], errors
    assert not any(tmp_path.iterdir())


def test_copy_paste_is_refused_for_keypoint_data(tmp_path):
    from seglab.engine.config import TrainConfig
    from seglab.engine.keypoints import KEYPOINT_DEFAULTS, KeypointTrainer

    values = {**KEYPOINT_DEFAULTS, "encoder": "resnet10t", "image_size": 64, "train_samples": 2, "val_samples": 2,
              "augment": {"copy_paste": 0.5}, "out": str(tmp_path)}
    with pytest.raises(ValueError, match="copy_paste pastes objects by their masks"):
        KeypointTrainer(TrainConfig.from_dict(values))


def test_predictors_name_the_task_of_a_foreign_checkpoint(tmp_path):
    from seglab.engine.instance_predictor import InstancePredictor
    from seglab.engine.keypoints import KeypointPredictor

    assert main(["train", "--task", "keypoint", *TINY, "--epochs", "1", "--out", str(tmp_path), "--name", "run"]) == 0
    with pytest.raises(ValueError, match="is for task 'keypoint'; this predictor is for instance models"):
        InstancePredictor.from_checkpoint(tmp_path / "run")
    predictor = KeypointPredictor.from_checkpoint(tmp_path / "run", score_threshold=0.0)
    found = predictor.predict(torch.rand(3, 48, 48))
    assert found["keypoints"].shape[1:] == (7, 3) and len(found["keypoints"]) == len(found["scores"])


def _coco_keypoint_file(folder, count: int = 10):
    """The first `count` synthetic figures' images as PNGs in folder/images and their targets as a
    COCO keypoint file whose one category has id 3 (the results must carry it, not the label 1)."""
    from seglab.data.keypoints import SyntheticPoses

    data = SyntheticPoses(num_samples=count, image_size=64)
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        image, target = data[index]
        name = f"{index:03d}.png"
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / "images" / name)
        images.append({"id": 100 + index, "file_name": name, "height": 64, "width": 64})
        for box, points, area in zip(target["boxes"].tolist(), target["keypoints"].tolist(), target["area"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + index, "category_id": 3, "iscrowd": 0,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area": area,
                                "keypoints": [v for point in points for v in point],
                                "num_keypoints": sum(point[2] > 0 for point in points)})
    category = {"id": 3, "name": "figure", "keypoints": list(data.keypoint_names),
                "skeleton": [[i + 1, j + 1] for i, j in data.skeleton]}
    path = folder / "person_keypoints.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [category]}))
    return path


def test_training_and_evaluation_on_a_coco_keypoint_file(tmp_path, capsys):
    annotation_file = _coco_keypoint_file(tmp_path / "set")
    run = tmp_path / "runs" / "coco"
    assert main(["train", "--task", "keypoint", "--data", str(annotation_file), "--encoder", "resnet10t", "--image-size", "64",
                 "--batch-size", "4", "--epochs", "1", "--out", str(tmp_path / "runs"), "--name", "coco"]) == 0
    _, config = load_checkpoint(run)
    assert config["classes"] == ["background", "figure"] and config["category_ids"] == [3]
    assert config["data"]["source"] == str(annotation_file)
    metrics_file = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(run), "--json", str(metrics_file), "--split", "val"]) == 0
    assert "2 images" in capsys.readouterr().out  # every 5th of 10 images, by id
    records = json.loads(metrics_file.with_suffix(".results.json").read_text())
    assert records and {r["category_id"] for r in records} == {3} and {r["image_id"] for r in records} <= {104, 109}
    # a --format that is not the file's layout is one line
    assert main(["eval", "--checkpoint", str(run), "--format", "instance"]) == 2
    assert "keypoint data is a COCO file" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--image-size", "32"]) == 2  # a data set keeps its images' sizes
    assert "--image-size sizes the synthetic set; " in capsys.readouterr().err
