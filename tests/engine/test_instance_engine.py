"""`seglab train --task instance`, `seglab eval` and `seglab predict` with an instance checkpoint, end to end (tiny)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.cli import main
from seglab.engine.checkpoint import load_checkpoint
from seglab.engine.precision import resolve_precision


def test_train_eval_predict_an_instance_model(tmp_path, capsys, monkeypatch):
    code = main([
        "train", "--task", "instance", "--model", "yolact", "--encoder", "resnet10t", "--image-size", "64",
        "--train-samples", "4", "--val-samples", "2", "--epochs", "1", "--batch-size", "2",
        "--out", str(tmp_path), "--name", "tiny",
    ])
    assert code == 0
    run = tmp_path / "tiny"
    for name in ("best.safetensors", "best.json", "last.safetensors", "metrics.jsonl", "config.yaml", "overlays/val_000.png"):
        assert (run / name).is_file(), name
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"ap", "ap50", "ap75", "boundary_ap", "train_loss"} <= set(row)
    terms = {"train_loss_classifier", "train_loss_box", "train_loss_mask", "train_loss_semantic"}
    assert terms <= set(row)  # each of YOLACT's loss terms, per epoch
    assert abs(sum(row[t] for t in terms) - row["train_loss"]) < 1e-4 * max(1.0, row["train_loss"])
    model, config = load_checkpoint(run)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert config["task"] == "instance" and config["model"] == "yolact" and config["kwargs"]["encoder"] == "resnet10t"
    # the arithmetic it was trained in, resolved (auto is not a record)
    assert config["training"] == {"precision": resolve_precision("auto", torch.device("cpu")).name, "int8_products": False}

    metrics_file = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(run), "--json", str(metrics_file)]) == 0
    printed = capsys.readouterr().out
    assert "mask AP" in printed and "AP50" in printed and "boundary AP" in printed
    assert "ap" in json.loads(metrics_file.read_text())
    assert isinstance(json.loads(metrics_file.with_suffix(".results.json").read_text()), list)

    image_file = tmp_path / "picture.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(image_file)
    out = tmp_path / "predicted"
    assert main(["predict", "--checkpoint", str(run), str(image_file), "--out", str(out)]) == 0
    for name, mode in (("picture_overlay.png", "RGB"), ("picture_instances.png", "I;16"), ("picture_classes.png", "L")):
        with Image.open(out / name) as written:
            assert (written.size, written.mode) == ((56, 40), mode), name
    records = json.loads((out / "results.json").read_text())
    assert all(r["image_id"] == 1 and {"segmentation", "score", "category_id", "bbox"} <= set(r) for r in records)
    masks_only = tmp_path / "masks-only"
    assert main(["predict", "--checkpoint", str(run), str(image_file), "--out", str(masks_only), "--no-overlays"]) == 0
    assert sorted(p.name for p in masks_only.iterdir()) == ["images.json", "picture_classes.png", "picture_instances.png", "results.json"]
    assert json.loads((masks_only / "results.json").read_text()) == records

    # Semantic-only options are refused for an instance model (one error line, exit 2), not ignored;
    # so is an output folder that is a file.
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), str(image_file), "--out", str(out), "--crf", "--tile", "32"]) == 2
    assert main(["eval", "--checkpoint", str(run), "--crf-params", "w1=3"]) == 2
    assert main(["predict", "--checkpoint", str(run), str(image_file), "--out", str(image_file)]) == 2
    assert main(["predict", "--checkpoint", str(run), str(image_file), "--out", str(out), "--precision", "int8"]) == 2
    assert main(["predict", "--checkpoint", str(run), str(image_file), "--out", str(out), "--calibration", str(image_file)]) == 2
    # --precision is honoured, so a precision the device cannot run is refused, not ignored.
    assert main(["eval", "--checkpoint", str(run), "--precision", "16"]) == 2
    assert main(["predict", "--checkpoint", str(run), str(image_file), "--out", str(out), "--precision", "16"]) == 2
    errors = capsys.readouterr().err.splitlines()
    fp16_on_cpu = "seglab: error: --precision 16 (float16) needs a CUDA device; on the CPU use --precision bf16"
    assert errors == [
        f"seglab: error: --crf, --tile: for semantic models only; {run} is an instance model",
        f"seglab: error: --crf-params: for semantic models only; {run} is an instance model",
        f"seglab: error: cannot use {image_file} as the output folder: it exists and is not a folder",
        f"seglab: error: --precision int8: for semantic models only; {run} is an instance model",
        f"seglab: error: --calibration: for semantic models only; {run} is an instance model",
        fp16_on_cpu,
        fp16_on_cpu,
    ]

    # --direct-convolutions reaches the fast path of both commands.
    import seglab.engine.instance as instance
    import seglab.engine.instance_predictor as instance_predictor

    asked = []
    real = instance.optimize_instance_model

    def recording(model, *args, winograd=True, **kwargs):
        asked.append(winograd)
        return real(model, *args, winograd=winograd, **kwargs)

    monkeypatch.setattr(instance, "optimize_instance_model", recording)
    monkeypatch.setattr(instance_predictor, "optimize_instance_model", recording)
    for command in (["eval", "--checkpoint", str(run)], ["predict", "--checkpoint", str(run), str(image_file), "--out", str(out)]):
        assert main(command) == 0 and main([*command, "--direct-convolutions"]) == 0
    assert asked == [True, False, True, False]


class _AutocastRecorder(torch.nn.Module):
    """Runs an instance model and notes the autocast dtype each call ran under (None: off)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.dtypes = model, []

    def forward(self, images):
        self.dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return self.model(images)


def test_instance_evaluation_and_prediction_run_under_the_given_autocast(tmp_path):
    from torch.utils.data import DataLoader

    from seglab.data.instance import SyntheticInstances, collate_instances
    from seglab.engine.instance import evaluate_instances
    from seglab.engine.instance_predictor import InstancePredictor
    from seglab.models import create_model

    torch.manual_seed(0)
    # Mask R-CNN's masks and scores come out of bf16 autocast in bf16, which NumPy cannot read.
    model = create_model("mask_rcnn", encoder="resnet10t", fpn_channels=32, anchor_size=8, min_size=0, proposals=30,
                         detections_per_image=5, num_classes=3).eval()
    model.roi_heads.score_thresh = 0.0
    recorder = _AutocastRecorder(model)
    data = SyntheticInstances(num_samples=2, image_size=64, num_classes=3, seed=1)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731 (emulated where not native)
    results = evaluate_instances(recorder, DataLoader(data, batch_size=2, collate_fn=collate_instances), data.classes,
                                 results_json=tmp_path / "results.json", autocast=bf16)
    assert recorder.dtypes == [torch.bfloat16] and 0.0 <= results["ap50"] <= 1.0
    assert all(isinstance(r["score"], float) for r in json.loads((tmp_path / "results.json").read_text()))
    image_file = tmp_path / "picture.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image_file)
    predictor = InstancePredictor(recorder, {"classes": data.classes}, "cpu", precision="32", optimize=False)
    predictor.predict_files([image_file], tmp_path / "out")
    assert recorder.dtypes[-1] is None  # float32: no autocast
    predictor.autocast = bf16
    predictor.predict_files([image_file], tmp_path / "out")
    assert recorder.dtypes == [torch.bfloat16, None, torch.bfloat16] and (tmp_path / "out" / "picture_instances.png").is_file()


def test_yolact_anchors_follow_the_training_boxes_unless_given():
    from seglab.data.box_stats import anchor_size_for, object_sides
    from seglab.data.instance import instance_transforms, open_instance_dataset
    from seglab.engine.config import TrainConfig
    from seglab.engine.instance import INSTANCE_DEFAULTS, InstanceTrainer

    values = {**INSTANCE_DEFAULTS, "model": "yolact", "encoder": "resnet10t", "image_size": 96, "train_samples": 6, "val_samples": 2}
    torch.manual_seed(0)
    train_set = open_instance_dataset("synthetic", "train", transforms=instance_transforms(True), num_samples=6, image_size=96, seed=0)
    expected = anchor_size_for(object_sides(train_set))
    assert expected != 96 // 6  # the image-size rule would give another size here
    assert InstanceTrainer(TrainConfig.from_dict(values)).model_kwargs["anchor_size"] == expected
    given = {**values, "model_kwargs": {"anchor_size": 12}}
    trainer = InstanceTrainer(TrainConfig.from_dict(given))
    assert trainer.model_kwargs["anchor_size"] == 12 and trainer.model.anchor_size == 12


def test_instance_run_ends_its_schedule_within_the_budget(tmp_path):
    from seglab.engine.config import TrainConfig
    from seglab.engine.instance import INSTANCE_DEFAULTS, InstanceTrainer

    values = {
        **INSTANCE_DEFAULTS, "model": "yolact", "encoder": "resnet10t", "image_size": 64, "train_samples": 4, "val_samples": 2,
        "batch_size": 2, "epochs": 10, "max_minutes": 10, "fit_to_budget": True, "out": str(tmp_path), "warmup_epochs": 0,
    }
    now = [0.0]
    trainer = InstanceTrainer(TrainConfig.from_dict(values), clock=lambda: now[0])
    one_epoch = trainer.train_one_epoch

    def slow_epoch(*args):  # each epoch takes 190 s of the 600 on the budget's clock
        now[0] += 190.0
        return one_epoch(*args)

    trainer.train_one_epoch = slow_epoch
    summary = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "yolact-synthetic" / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs_run"] == len(rows) == 3  # three fit in 600 s; the cosine ends with the third
    assert rows[-1]["lr"] == 0.0 and rows[0]["lr"] > 0


def test_an_instance_run_stopped_after_an_epoch_resumes_to_the_same_figures(tmp_path, capsys):
    # Before, instance runs wrote no resume.pt and `--resume` said they had finished no epoch.
    from seglab.engine.config import TrainConfig
    from seglab.engine.instance import INSTANCE_DEFAULTS, InstanceTrainer

    values = {**INSTANCE_DEFAULTS, "model": "yolact", "encoder": "resnet10t", "image_size": 64, "train_samples": 16,
              "val_samples": 4, "batch_size": 8, "epochs": 2, "out": str(tmp_path), "model_kwargs": {"anchor_size": 12}}
    InstanceTrainer(TrainConfig.from_dict({**values, "name": "whole"})).fit()
    # The budget ends the run after epoch 1 (it is checked after each epoch); its schedule still spans 2.
    InstanceTrainer(TrainConfig.from_dict({**values, "name": "cut", "max_minutes": 1e-6})).fit()
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 1
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    assert "resuming after epoch 1 of 2" in capsys.readouterr().err

    def rows(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    whole, cut = rows("whole"), rows("cut")
    assert [r["epoch"] for r in cut] == [1, 2]
    for key in ("train_loss", "train_loss_mask", "ap", "lr"):
        assert [r[key] for r in cut] == [r[key] for r in whole], key
    assert (tmp_path / "cut" / "best.safetensors").is_file() and (tmp_path / "cut" / "overlays").is_dir()


@pytest.mark.parametrize("option", [["--loss", "dice"], ["--ema-decay", "0.99"], ["--accumulate", "2"], ["--tensorboard"],
                                    ["--sync-bn"], ["--class-weights", "1,2"], ["--nproc", "2"]])
def test_options_instance_training_does_not_take_are_refused_in_one_line(tmp_path, capsys, option):
    # Before, each was ignored without a word (and --nproc 2 trained the whole model twice).
    code = main(["train", "--task", "instance", "--model", "yolact", "--out", str(tmp_path), *option])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"seglab: error: {option[0]}") and len(error.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_instance_training_stops_early_after_patience_epochs_without_a_better_mask_ap(tmp_path, capsys):
    from seglab.engine.config import TrainConfig
    from seglab.engine.instance import INSTANCE_DEFAULTS, InstanceTrainer

    values = {**INSTANCE_DEFAULTS, "model": "yolact", "encoder": "resnet10t", "image_size": 64, "train_samples": 8,
              "val_samples": 2, "batch_size": 8, "epochs": 6, "patience": 2, "out": str(tmp_path),
              "model_kwargs": {"anchor_size": 12}}
    trainer = InstanceTrainer(TrainConfig.from_dict(values))
    scores = iter([0.2, 0.1, 0.3, 0.3, 0.25, 0.5])  # best at epoch 3, then two epochs no better: stop after 5
    real = trainer.evaluate

    def scripted(*args, **kwargs):
        results = real(*args, **kwargs)
        return {**results, "ap": next(scores)}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "evaluate", scripted)
        summary = trainer.fit()
    assert summary["epochs_run"] == 5 and summary["best_epoch"] == 3 and summary["ap"] == 0.3
    assert "early stop: no better mask AP for 2 epoch(s) (best 0.3000 at epoch 3)" in capsys.readouterr().err


def test_instance_formats_are_checked_against_the_layout_found(tmp_path):
    # Before, instance training took any --format and read the set as whatever it found.
    from seglab.data.instance import open_instance_dataset

    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    coco = tmp_path / "set.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match=r"--format coco: .*set is an instance folder .*give --format instance"):
        open_instance_dataset(str(folder), "train", format="coco")
    with pytest.raises(ValueError, match=r"--format instance: .*set.json is a COCO set; give --format coco"):
        open_instance_dataset(str(coco), "train", format="instance")
    with pytest.raises(ValueError, match="--format folder: instance data is coco or instance"):
        open_instance_dataset(str(folder), "train", format="folder")
    with pytest.raises(ValueError, match="synthetic set has no layout"):
        open_instance_dataset("synthetic", "train", format="coco")


def test_instance_training_reads_the_augment_options():
    from seglab.data.copy_paste import CopyPaste
    from seglab.data.instance import SyntheticInstances
    from seglab.engine.config import TrainConfig
    from seglab.engine.instance import INSTANCE_DEFAULTS, InstanceTrainer

    values = {**INSTANCE_DEFAULTS, "model": "yolact", "encoder": "resnet10t", "image_size": 64, "train_samples": 4, "val_samples": 2,
              "model_kwargs": {"anchor_size": 12}}
    plain = InstanceTrainer(TrainConfig.from_dict(values)).train_set
    assert isinstance(plain, SyntheticInstances) and plain.transforms is not None
    pasting = InstanceTrainer(TrainConfig.from_dict({**values, "augment": {"copy_paste": 0.5, "scale": [0.9, 1.1]}})).train_set
    assert isinstance(pasting, CopyPaste) and pasting.probability == 0.5
    assert pasting.dataset.transforms.transforms[2].scale == (0.9, 1.1)  # the affine zoom's range
    assert InstanceTrainer(TrainConfig.from_dict({**values, "augment": False})).train_set.transforms is None


def test_unknown_or_bad_instance_augment_options_get_one_error_line(tmp_path, capsys):
    base = ["train", "--task", "instance", "--model", "yolact", "--encoder", "resnet10t", "--image-size", "64",
            "--train-samples", "2", "--val-samples", "2", "--epochs", "1", "--out", str(tmp_path)]
    for augment, message in [
        ("augment: {rotation: 10}", "unknown augment option(s) for instance data: rotation; known: scale, copy_paste"),
        ("augment: {copy_paste: 2}", "augment option 'copy_paste' must be a probability between 0 and 1, not 2"),
    ]:
        config = tmp_path / "recipe.yaml"
        config.write_text(augment + "\n")
        assert main([*base, "--config", str(config)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"seglab: error: {message}"


def test_float32_instance_training_runs_its_wide_3x3_convs_by_winograd_unless_direct(tmp_path, monkeypatch):
    import contextlib

    import seglab.engine.convolutions as convolutions
    import seglab.engine.winograd as winograd
    from seglab.engine.config import TrainConfig
    from seglab.engine.instance import INSTANCE_DEFAULTS, InstanceTrainer

    values = {**INSTANCE_DEFAULTS, "model": "yolact", "encoder": "resnet10t", "image_size": 64, "train_samples": 4,
              "val_samples": 2, "batch_size": 2, "epochs": 1, "precision": "32", "out": str(tmp_path)}
    direct = InstanceTrainer(TrainConfig.from_dict({**values, "direct_convolutions": True}))
    assert isinstance(direct.convolutions, contextlib.nullcontext)
    trainer = InstanceTrainer(TrainConfig.from_dict(values))
    routed = {name for name, module in trainer.model.named_modules() if id(module) in trainer.convolutions.winograd_convs}
    # The FPN's output convs, the ProtoNet's 3x3 convs and the prediction head's (the backbone's
    # wide 3x3 convs too).
    assert {"backbone.fpn.layer_blocks.0.0", "protonet.before_upsampling.0", "head.shared.0"} <= routed
    # At 64 x 64 no map is large enough to pay, so force the route to see that a step runs
    # through it, forward and backward, and trains.
    calls = []
    real = convolutions.winograd_conv3x3

    def counted(x, *args):
        calls.append(x.shape[1])
        return real(x, *args)

    monkeypatch.setattr(winograd, "pays_for_input", lambda *args, **kwargs: True)
    monkeypatch.setattr(convolutions, "winograd_conv3x3", counted)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    summary = trainer.fit()
    assert calls and min(calls) >= winograd.min_channels(training=True)
    row = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["train_loss"])
    changed = [not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters())]
    assert sum(changed) > 0.9 * len(changed)
    # Outside the steps the modules are as they were.
    assert not any("_conv_forward" in vars(m) for m in trainer.model.modules())


def _coco_folder(root: Path, count: int) -> Path:
    """`count` 32 x 32 images with a square of category 3 and one of category 7 each (sparse
    ids, listed out of order), as root/images/ and root/instances.json."""
    images, annotations = [], []
    (root / "images").mkdir(parents=True)
    for index in range(count):
        name = f"i{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": index + 1, "file_name": name, "height": 32, "width": 32})
        for number, category in enumerate((3, 7)):
            x = 4 + 14 * number
            annotations.append({"id": 2 * index + number + 1, "image_id": index + 1, "category_id": category, "iscrowd": 0,
                                "segmentation": [[x, 4, x + 10, 4, x + 10, 14, x, 14]], "area": 100, "bbox": [x, 4, 10, 10]})
    document = {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "box"}, {"id": 3, "name": "blob"}]}
    (root / "instances.json").write_text(json.dumps(document))
    return root


def test_instance_training_on_a_coco_file_keeps_its_category_ids_and_says_which_val_images_it_scores(tmp_path):
    from seglab.engine.config import TrainConfig
    from seglab.engine.instance import INSTANCE_DEFAULTS, InstanceTrainer

    data = _coco_folder(tmp_path / "coco", 10)  # every 5th image is val: 2 of them
    for val_samples, words in ((1, "the first 1 of 2 val (--val-samples)"), (100, "2 val")):
        config = TrainConfig.from_dict({**INSTANCE_DEFAULTS, "model": "yolact", "encoder": "resnet10t", "image_size": 32,
                                        "data": str(data), "val_samples": val_samples, "out": str(tmp_path / "runs")},
                                       source="options")
        trainer = InstanceTrainer(config)
        assert len(trainer.train_set) == 8 and trainer._val_words() == words  # as the first line of training says
    saved = trainer.checkpoint_config(1, {})
    assert saved["classes"] == ["background", "blob", "box"] and saved["category_ids"] == [3, 7]
